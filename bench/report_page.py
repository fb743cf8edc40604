"""The results page's load time in headless Chromium, and the README's screenshot of it.

    python bench/report_page.py runs                          # the page of runs/, opened 5 times
    python bench/report_page.py runs --samples 449            # every run's role-play answers repeated to 449
    python bench/report_page.py runs --screenshot report.png  # then runs 0 and 17 side by side, as a PNG

The page is written from RUNS into a temporary folder (RUNS stays as it is; with --samples, a copy of its runs
whose role-play answers and scores are repeated to that many samples, the size of the study's test set). Each
time a fresh browser (tests/browser.py) opens it from disk; the load time is from the navigation's start to the
end of the page's first drawing (its "drawn" mark: the table, run 0's answers, the curves, the provenance), by
the page's own clock, and the wall time from the navigation command until the page says it is drawn.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from browser import Browser, find_browser  # noqa: E402  (the tests' browser driver: no package of its own)
from runtime.machine import cpu_model  # noqa: E402
from study.grid import EVAL_SETS  # noqa: E402
from study.report import REPORT, write_report  # noqa: E402
from study.results import read_runs  # noqa: E402
from study.rundir import EVAL, PREDICTIONS, RUN_JSON, SCORES  # noqa: E402

DRAWN = "document.documentElement.dataset.drawn === '1'"
ROLE_PLAY = EVAL_SETS[0]


def repeated(runs_dir: Path, samples: int, into: Path) -> Path:
    """A copy of the runs (their files, without adapters and checkpoints) whose role-play predictions and scores
    are repeated, with new indices, to `samples` lines."""
    for run_json in runs_dir.glob(f"*/{RUN_JSON}"):
        copy = into / run_json.parent.name
        shutil.copytree(run_json.parent, copy, ignore=shutil.ignore_patterns("checkpoints", "adapter_model.*"))
        for name in (PREDICTIONS, SCORES):
            path = copy / EVAL / ROLE_PLAY / name
            if path.is_file():
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
                path.write_text("".join(json.dumps({**rows[i % len(rows)], "index": i}, ensure_ascii=False) + "\n"
                                        for i in range(samples)), encoding="utf-8")
    return into


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a runs directory (launch.sh's RUNS)")
    p.add_argument("--times", type=int, default=5, help="page loads, each in a fresh browser")
    p.add_argument("--samples", type=int, help="repeat the role-play answers to this many samples")
    p.add_argument("--screenshot", type=Path, help="then show runs 0 and 17 side by side and save a PNG here")
    args = p.parse_args(argv)
    if find_browser() is None:
        sys.exit("bench/report_page.py: no Chromium: apt-get install -y chromium, or set CHROMIUM")
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = repeated(args.runs, args.samples, Path(tmp)) if args.samples else args.runs
        runs = read_runs(runs_dir, list(EVAL_SETS))
        t0 = time.perf_counter()
        page = write_report(Path(tmp), runs, list(EVAL_SETS), top=1)
        written = time.perf_counter() - t0
        drawn, wall = [], []
        for _ in range(args.times):
            with Browser() as b:
                version = b.send("Browser.getVersion", session=None)["product"]
                t0 = time.perf_counter()
                b.open(page, ready=DRAWN)
                wall.append(time.perf_counter() - t0)
                drawn.append(b.evaluate("performance.getEntriesByName('drawn')[0].startTime") / 1e3)
                if b.problems():
                    sys.exit(f"bench/report_page.py: the page reported {b.problems()}")
        if args.screenshot:
            with Browser(width=1280, height=800) as b:
                b.open(page, ready=DRAWN)
                b.click("#results a[data-run='17']")  # its answers beside run 0's
                b.wait_for("document.getElementById('sec-answers').classList.contains('on')")
                args.screenshot.write_bytes(b.screenshot())
        samples = {n: max(len(r["scores"][n] or []) for r in runs) for n in EVAL_SETS}
        print(f"{REPORT}: {len(runs)} runs, samples per set {samples}, {page.stat().st_size / 2**20:.2f} MiB, "
              f"written in {written:.2f} s")
        print(f"{version} on {cpu_model()}: drawn {statistics.median(drawn):.2f} s after the navigation's start "
              f"(median of {args.times}, max {max(drawn):.2f}); wall {statistics.median(wall):.2f} s "
              f"(max {max(wall):.2f})")


if __name__ == "__main__":
    main()
