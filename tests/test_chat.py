"""The study's decode rule and `evaluate.py --chat`: streaming, history that fits, messages that keep the session
alive, and a session on a real pseudo-terminal with a tiny checkpoint trained to emit <sop> mid-answer."""
import contextlib
import io
import os
import select
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import evaluate
from conftest import REPO, script_env
from data import build_prompt
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.generate import generate_ids, left_pad
from model.loader import load_model, save_model
from model.loss import IGNORE
from model.tokenizer import DEMO_TOKENIZER, SPECIAL_PIECES, load_tokenizer

KEPT = ["[gMASK]", "[sMASK]", "<unused_0>", "<ENC>", "<dBLOCK>"]
SKIPPED = ["<sop>", "<eop>", "<unk>", "<pad>", "[MASK]"]
SCREEN_NEVER = SPECIAL_PIECES + ["<pad>", "<unk>", "⁇", "Traceback"]
# Three turns of one session; each answer is first part <sop> second part <eop>.
QUERIES = ["你好", "今天天气怎么样", "再见"]
PARTS = [("你好", "世界"), ("天气很好", "出去走走吧"), ("再见", "明天见")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


# ----------------------------------------------------------------------------- decode rule
def test_decode_skip_drops_exactly_the_five_and_keeps_the_other_pieces(tok):
    hello = tok.encode("你好", add_special_tokens=False)
    assert sorted(tok.skipped_ids) == sorted(tok.special_ids[p] for p in SKIPPED)
    for piece in SKIPPED:
        assert tok.decode(hello + [tok.special_ids[piece]] + hello, skip_special_tokens=True) == "你好 你好"
    for piece in KEPT:  # as the reference tokenizer under transformers 4.30.2
        ids = hello + [tok.special_ids[piece]] + hello
        assert tok.decode(ids, skip_special_tokens=True) == f"你好{piece} 你好" == tok.decode(ids)
    assert tok.decode(hello + [tok.unk_id] + hello) == "你好 ⁇  你好"
    assert tok.decode(hello + [tok.sop_id, tok.eop_id]) == "你好<sop><eop>"
    # pads and ids past the tokenizer's pieces are dropped either way
    assert tok.decode(hello + [tok.pad_id, tok.vocab_size + 5]) == "你好"
    text = "第一行\n  缩进\t结束"
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == text


def test_generate_batch_predictions_follow_the_rule(tok, monkeypatch):
    hello = tok.encode("你好", add_special_tokens=False)
    rows = [hello + [tok.sop_id, tok.special_ids["[gMASK]"]] + hello + [tok.eop_id], hello + [tok.mask_id]]
    monkeypatch.setattr(evaluate, "generate_ids", lambda *a, **kw: rows)
    gen = evaluate.parse_args(["--greedy"]).gen
    batch = [{"index": i, "prompt": "p", "label": "l", "input_ids": [1]} for i in range(2)]
    model = SimpleNamespace(transformer=SimpleNamespace())  # generate_batch sets its attention kernel
    records = evaluate.generate_batch(model, tok, batch, gen)
    assert [(r["predict"], r["hit_length_cap"]) for r in records] == [("你好[gMASK] 你好", False), ("你好", True)]


# ----------------------------------------------------------------------------- generate_ids hooks
def test_suppress_ids_and_on_token():
    model = load_model("tiny")
    prompt = load_tokenizer("tiny").encode("你好")
    plain = generate_ids(model, [prompt], max_new_tokens=6)[0]
    seen = []
    streamed = generate_ids(model, [prompt], max_new_tokens=6, on_token=lambda s, n: seen.append((s, n.tolist())))
    assert streamed == [plain]
    assert seen == [(s, [t]) for s, t in enumerate(plain)]
    last = torch.zeros(1, len(prompt), dtype=torch.bool)
    last[0, -1] = True
    with torch.no_grad():
        second = int(model(torch.tensor([prompt]), logits_at=last)[0].topk(2).indices[1])
    assert generate_ids(model, [prompt], max_new_tokens=1, suppress_ids=[plain[0]])[0] == [second]


# ----------------------------------------------------------------------------- history that fits
def test_fit_history_drops_the_oldest_rounds_and_keeps_the_query_whole(tok):
    history = [[f"问题{i}", f"回答{i}" * 6] for i in range(10)]
    query = "最后的问题是什么"
    fits = len(tok.encode(build_prompt(query, history[7:])))
    ids, kept, dropped = evaluate.fit_history(tok, query, history, fits)
    assert (kept, dropped) == (history[7:], 7)
    assert ids == tok.encode(build_prompt(query, history[7:])) and len(ids) == fits
    part = tok.encode(f"\n[Round 3]\n问：{query}\n答：")[1:]  # [1:]: sentencepiece's leading "▁", absent mid-text
    assert ids[-len(part):] == part and ids[-2:] == [tok.gmask_id, tok.sop_id]
    assert tok.decode(ids[:-2]).startswith("[Round 0]\n问：问题7\n答：")
    assert evaluate.fit_history(tok, query, history, fits - 1)[1:] == (history[8:], 8)
    # a history that fits is kept whole
    assert evaluate.fit_history(tok, query, history, 10_000) == (tok.encode(build_prompt(query, history)), history, 0)
    alone = len(tok.encode(query))
    assert evaluate.fit_history(tok, query, history, alone) == (tok.encode(query), [], 10)
    assert evaluate.fit_history(tok, query, history, alone - 1) == (None, [], 10)


def test_unprinted_holds_back_incomplete_text():
    assert evaluate.unprinted("你", "你好") == "好"
    assert evaluate.unprinted("你", "你\ufffd") == ""
    assert evaluate.unprinted("你好", "你") == ""  # does not extend what is shown


# ----------------------------------------------------------------------------- chat sessions on a pipe
def piped_chat(monkeypatch, capsys, lines: list[str], flags=(), stop_first=False):
    """Run --chat on the tiny preset with a fake generator that answers "好的" -> (prompts seen, screen)."""
    tok = load_tokenizer("tiny")
    row = tok.encode("好的", add_special_tokens=False) + [tok.eop_id]
    prompts = []

    def fake(model, prompt_ids, **kw):
        prompts.append(tok.decode(prompt_ids[0][:-2]))  # without [gMASK] <sop>
        if stop_first and len(prompts) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the answer
        for step, i in enumerate(row):
            kw["on_token"](step, torch.tensor([i]))
        return [row]

    monkeypatch.setattr(evaluate, "generate_ids", fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    evaluate.main(["--chat", "--model", "tiny", "--greedy", *flags])
    return prompts, capsys.readouterr().out, "好的"


def test_reserved_string_and_too_long_query_get_a_line_and_the_session_goes_on(monkeypatch, capsys):
    long = "一二三四五六七八九十" * 3
    prompts, out, answer = piped_chat(monkeypatch, capsys, ["请说<sop>", long, "嗨", "再见"],
                                      ["--max-source-length", "40"])
    n = len(load_tokenizer("tiny").encode(long))
    assert n > 40
    assert "(the message contains '<sop>', which the tokenizer reads as a special token" in out
    assert f"(this message alone is {n} prompt tokens and --max-source-length is 40: not sent" in out
    assert prompts == ["嗨", f"[Round 0]\n问：嗨\n答：{answer}\n[Round 1]\n问：再见\n答："]
    assert out.count(f"ChatGLM: {answer}\n") == 2


def test_long_history_drops_oldest_rounds_once_told(monkeypatch, capsys):
    queries = ["第一个问题", "第二个问题", "第三个问题", "第四个问题", "第五个问题"]
    # with the answer 好的: the 3rd prompt with 2 rounds of history is 60 tokens, the 4th with 3 rounds 82, with 2 63
    prompts, out, a = piped_chat(monkeypatch, capsys, queries, ["--max-source-length", "63"])
    assert out.count("(older rounds no longer fit --max-source-length 63: dropped from the prompt)") == 1
    rounds = [f"问：{q}\n答：{a}\n" for q in queries]
    assert prompts[:2] == [queries[0], f"[Round 0]\n{rounds[0]}[Round 1]\n问：{queries[1]}\n答："]
    assert prompts[2] == f"[Round 0]\n{rounds[0]}[Round 1]\n{rounds[1]}[Round 2]\n问：{queries[2]}\n答："
    assert prompts[3] == f"[Round 0]\n{rounds[1]}[Round 1]\n{rounds[2]}[Round 2]\n问：{queries[3]}\n答："
    assert prompts[4] == f"[Round 0]\n{rounds[2]}[Round 1]\n{rounds[3]}[Round 2]\n问：{queries[4]}\n答："


def test_stopped_answer_leaves_no_round(monkeypatch, capsys):
    prompts, out, answer = piped_chat(monkeypatch, capsys, ["你好", "再见"], stop_first=True)
    assert prompts == ["你好", "再见"]
    assert "ChatGLM:  (stopped)\n" in out and out.count(f"ChatGLM: {answer}\n") == 1


def interrupt_at(real, nth, match=lambda *args: True):
    """`real`, except that its nth call with arguments that match raises KeyboardInterrupt instead."""
    seen = []

    def call(*args, **kw):
        if match(*args):
            seen.append(args)
            if len(seen) == nth:
                raise KeyboardInterrupt
        return real(*args, **kw)
    return call


# Where a person's Ctrl-C lands in the second turn: while the history is tokenized, on the `ChatGLM: ` printed
# just before generating, and once the answer is on the screen, while it is cleaned before being stored.
@pytest.mark.parametrize("name, real, match, generated", [
    ("fit_history", evaluate.fit_history, lambda *args: True, False),
    ("print", print, lambda *args: args == ("ChatGLM: ",), False),
    ("reserved_in", evaluate.reserved_in, lambda text: text == "好的", True),
], ids=["tokenizing", "ChatGLM-shown", "storing"])
def test_ctrl_c_anywhere_in_a_turn_stops_that_turn_and_keeps_the_history(monkeypatch, capsys, name, real, match,
                                                                         generated):
    monkeypatch.setattr(evaluate, name, interrupt_at(real, 2, match), raising=False)  # print: shadows the builtin
    prompts, out, a = piped_chat(monkeypatch, capsys, QUERIES)
    round0 = f"[Round 0]\n问：{QUERIES[0]}\n答：{a}\n"
    second = [f"{round0}[Round 1]\n问：{QUERIES[1]}\n答："] if generated else []
    assert prompts == [QUERIES[0], *second, f"{round0}[Round 1]\n问：{QUERIES[2]}\n答："]
    assert out.count(" (stopped)\n") == 1 and out.count(f"ChatGLM: {a}\n") == len(prompts)


# ----------------------------------------------------------------------------- a session on a terminal
@pytest.fixture(scope="module")
def sop_checkpoint(tmp_path_factory, tok):
    """The tiny preset overfit so that greedy decoding answers the session's three prompts with
    `first <sop> second <eop>` -> (checkpoint dir, [(prompt ids, answer ids, answer text)])."""
    turns, history = [], []
    for q, (a, b) in zip(QUERIES, PARTS):
        answer = tok.encode(a, add_special_tokens=False) + [tok.sop_id] + tok.encode(b, add_special_tokens=False)
        answer = answer + [tok.eop_id]
        turns.append((tok.encode(build_prompt(q, history)), answer, tok.decode(answer, skip_special_tokens=True)))
        history = history + [[q, turns[-1][2]]]
    config = ChatGLMConfig.from_name("tiny")
    model = ChatGLMModel(config).init_weights(0)
    ids, mask = left_pad([p + a for p, a, _ in turns], tok.pad_id)  # (3, T)
    targets = torch.full_like(ids, IGNORE)  # (3, T): position t predicts id t + 1, answers only
    for i, (_, a, _) in enumerate(turns):
        targets[i, ids.shape[1] - len(a) - 1:-1] = torch.tensor(a)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(ids, mask, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.3:  # a sum over 28 answer tokens: every argmax is right long before this
            break
    out = save_model(model.state_dict(), config, tmp_path_factory.mktemp("sop") / "ckpt",
                          tokenizer_file=DEMO_TOKENIZER)
    return out, turns


@contextlib.contextmanager
def chat_in_pty(model_dir):
    """`evaluate.py --chat --greedy` with stdin, stdout and stderr on a new pseudo-terminal that is its controlling
    terminal (so ^C written to it is SIGINT) -> (process, master fd); killed and closed on the way out."""
    master, slave = os.openpty()
    # a new session takes the terminal on stdin as its own, then runs evaluate.py (no preexec_fn: threads here)
    ctty = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", ctty, sys.executable, "evaluate.py", "--chat", "--model",
                             str(model_dir), "--greedy"], cwd=REPO, env=script_env(), stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        yield proc, master
    finally:
        proc.kill()
        os.close(master)


def read_screen(master, screen: bytearray, deadline: float, until: bytes | None = None, count: int = 0):
    """Append the terminal's output to `screen` until it shows `until` `count` times, or (until=None) until
    the process closes the terminal. A hang fails at `deadline`."""
    while until is None or screen.count(until) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {until!r}; the screen:\n{screen.decode(errors='replace')}"
        if not select.select([master], [], [], left)[0]:
            continue
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: every process holding the terminal has exited
            data = b""
        screen += data
        if not data:
            assert until is None, f"evaluate.py exited; the screen:\n{screen.decode(errors='replace')}"
            return


def test_checkpoint_emits_sop_mid_answer(sop_checkpoint):
    path, turns = sop_checkpoint
    model = load_model(path)
    rows = generate_ids(model, [p for p, _, _ in turns], max_new_tokens=32)
    assert rows == [a for _, a, _ in turns]
    sop = load_tokenizer(path).sop_id
    assert all(0 < row.index(sop) < len(row) - 2 for row in rows)  # text, <sop>, more text, <eop>


@pytest.mark.slow
def test_three_turns_on_a_terminal_then_ctrl_d(sop_checkpoint):
    path, turns = sop_checkpoint
    screen, prompt, deadline = bytearray(), "用户：".encode(), time.monotonic() + 60
    with chat_in_pty(path) as (proc, master):
        for k, query in enumerate(QUERIES):
            read_screen(master, screen, deadline, prompt, k + 1)
            os.write(master, query.encode() + b"\n")
        read_screen(master, screen, deadline, prompt, len(QUERIES) + 1)
        os.write(master, b"\x04")
        read_screen(master, screen, deadline)
        assert proc.wait(timeout=10) == 0
    text = screen.decode()
    assert [a for _, _, a in turns if f"ChatGLM: {a}\r\n" not in text] == [], text
    assert [s for s in SCREEN_NEVER if s in text] == []


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_exits_0(sop_checkpoint):
    screen, deadline = bytearray(), time.monotonic() + 60
    with chat_in_pty(sop_checkpoint[0]) as (proc, master):
        read_screen(master, screen, deadline, "用户：".encode(), 1)
        # input() writes the prompt, then blocks reading; a SIGINT between the two waits for the read to return
        # (CPython's readline), a moment no person can hit: give the child time to block first
        time.sleep(1.0)
        os.write(master, b"\x03")
        read_screen(master, screen, deadline)
        assert proc.wait(timeout=10) == 0
    assert "Traceback" not in screen.decode()
