"""Headless Chromium for the tests, driven over its own DevTools protocol on a pipe (--remote-debugging-pipe): JSON
messages, each ended by a NUL byte; the browser reads commands on its fd 3 and writes answers and events on its
fd 4. No driver package: opening a page from disk, clicks and keys as a person makes them, the text shown, the
console's errors, the requests made and a screenshot are all the tests need, and this is all of it.

    with Browser() as b:
        b.open(Path("runs/report.html"))
        b.click("#tab-answers")
        b.text("#count"), b.problems(), b.screenshot()

find_browser() says where Chromium is (CHROMIUM in the environment, else chromium or google-chrome on PATH);
None where there is none: `apt-get install -y chromium` (Debian) installs it.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return os.environ.get("CHROMIUM") or next((p for p in map(shutil.which, NAMES) if p), None)


class Browser:
    def __init__(self, executable: str | None = None, width: int = 1366, height: int = 900, wait_s: float = 60):
        """A fresh browser (its own profile in a temporary folder) with one page of width x height CSS pixels.
        wait_s bounds every wait for an answer, so that a browser that hangs fails the test instead of hanging it."""
        self.wait_s = wait_s
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self.log = open(Path(self.profile.name) / "stderr.log", "w+b")
        to_browser, self.commands = os.pipe()
        self.answers, from_browser = os.pipe()

        def on_fds_3_and_4():  # in the child, before exec: the pipe's ends where the protocol wants them
            ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 5) for fd in (to_browser, from_browser)]  # off 3 and 4 first
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        flags = ["--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}", "--no-first-run",
                 "--no-default-browser-check", "--disable-gpu", "--disable-extensions", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--mute-audio", "about:blank"]
        if os.geteuid() == 0:  # CI runs as root, where Chromium's sandbox refuses to start
            flags.insert(0, "--no-sandbox")
        self.process = subprocess.Popen([executable or find_browser(), *flags], preexec_fn=on_fds_3_and_4,
                                        close_fds=False, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.events, self.next_id = b"", [], 0
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=None)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        # no network at all: a request to anything but the file itself would fail, and requests() lists it
        self.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                       "uploadThroughput": -1})

    # ------------------------------------------------------------ the protocol
    def send(self, method: str, params: dict | None = None, session: str | None = "page") -> dict:
        """One command -> its result; RuntimeError with the browser's message where it failed."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def receive(self) -> dict:
        deadline = time.monotonic() + self.wait_s
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.answers], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.answers, 1 << 20) if ready else None
            if not chunk:
                self.log.seek(0)
                why = "ended" if chunk == b"" else f"sent nothing for {self.wait_s:g} s"
                output = self.log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"the browser {why}; its output:\n{output}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    # ------------------------------------------------------------ what a person does and sees
    def open(self, path: Path, ready: str = "true"):
        """Load a file; wait for its load event, then until the JavaScript expression `ready` is true."""
        seen = len(self.events)
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()})
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:]):
            self.events.append(self.receive())
        self.wait_for(ready)

    def wait_for(self, expression: str):
        deadline = time.monotonic() + self.wait_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} still false after {self.wait_s:g} s")
            time.sleep(0.02)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-like values come back as Python's; a promise's
        once it settles)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str):
        """A left click in the middle of the first element that matches, once it is shown (as a person waits for
        it: a click before may have changed the page), scrolled into view."""
        find = f"document.querySelector({json.dumps(selector)})"
        self.wait_for(f"{find} && {find}.getClientRects().length > 0")
        x, y = self.evaluate(f"""(() => {{
            const el = {find};
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def press(self, key: str):
        """A key that types a character ("j", "/")."""
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": key, "text": key})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": key})

    def type(self, text: str):
        """Text typed into the focused field."""
        self.send("Input.insertText", {"text": text})

    def choose(self, selector: str, value: str):
        """An option of a <select> (its drop-down list is not drawn in a headless browser), as the page sees a
        person's choice: the value, then a change event."""
        self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            el.value = {json.dumps(value)};
            el.dispatchEvent(new Event("change", {{bubbles: true}}));
        }})()""")

    def text(self, selector: str) -> str:
        """The text shown by the first element that matches."""
        return self.texts(selector)[0]

    def texts(self, selector: str) -> list[str]:
        """The text each element that matches shows (innerText: what is rendered, as laid out), read once the next
        frame is drawn: a person reads the screen after a click has changed it, and the page lays out only what
        is on the screen (content-visibility)."""
        read = f"[...document.querySelectorAll({json.dumps(selector)})].map(el => el.innerText)"
        return self.evaluate(f"new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => "
                             f"done({read}))))")

    def screenshot(self) -> bytes:
        """What the page's viewport shows, as PNG bytes."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def problems(self) -> list[str]:
        """Every error the page reported so far: console.error and console.assert calls, uncaught exceptions,
        and the browser's own error entries (a resource that failed to load)."""
        self.evaluate("0")  # collect the events sent until now
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                out.append(details.get("exception", {}).get("description") or details["text"])
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"] + " " + p["entry"].get("url", ""))
        return out

    def requests(self) -> list[str]:
        """The address of every request the page made."""
        self.evaluate("0")
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    # ------------------------------------------------------------ the end
    def close(self):
        try:
            self.send("Browser.close", session=None)
            self.process.wait(timeout=10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)
        self.log.close()
        self.profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
