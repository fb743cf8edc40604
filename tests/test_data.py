"""The data path: registry validation, prompt text, encoding and truncation, padding, batch planning."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, build_train_samples
from data import (DEMO_DIR, DataError, build_eval_samples, build_prompt,
                  collate_train, encode_prompt, encode_train, format_report, global_batches, load_records, rank_share)
from model.tokenizer import load_tokenizer


GMASK, SOP, EOP, PAD = 5, 8, 9, 3  # the tiny preset's ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def write_dataset(tmp_path, records, name="d", file_name="d.json", sha1=True, columns=None, text=None):
    """A dataset dir with one registered file; `text` overrides the file's content verbatim."""
    path = tmp_path / file_name
    if text is None:
        if file_name.endswith(".jsonl"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            text = json.dumps(records, ensure_ascii=False, indent=1)
    path.write_text(text, encoding="utf-8")
    entry = {"file_name": file_name}
    if sha1:
        entry["file_sha1"] = hashlib.sha1(path.read_bytes()).hexdigest()
    if columns:
        entry["columns"] = columns
    info_path = tmp_path / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = entry
    info_path.write_text(json.dumps(info))
    return tmp_path


def rec(q, a, history=(), x=""):
    return {"instruction": q, "input": x, "output": a, "history": [list(t) for t in history]}


# ---------------------------------------------------------------- prompt text

def test_prompt_of_three_turn_record_is_exact():
    history = [["你好", "你好呀"], ["吃了吗", "吃过了"]]
    assert build_prompt("去哪儿", history) == (
        "[Round 0]\n问：你好\n答：你好呀\n[Round 1]\n问：吃了吗\n答：吃过了\n[Round 2]\n问：去哪儿\n答：")
    assert build_prompt("去哪儿", [], source_prefix="P:") == "P:去哪儿"
    assert build_prompt("q", [["a", "b"]], source_prefix="P:") == "P:[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答："


def test_load_records_appends_input_and_keeps_history(tmp_path):
    d = write_dataset(tmp_path, [rec("翻译：", "cat", x="猫"), rec("q", "a", [["h1", "g1"]])])
    records, report = load_records(["d"], d, seed=None)
    assert records[0] == {"prompt": "翻译：猫", "response": "cat", "history": [], "source": ("d", 0)}
    assert records[1]["history"] == [["h1", "g1"]] and records[1]["source"] == ("d", 1)
    assert report["datasets"]["d"]["kept"] == 2 and report["records"] == 2


# ---------------------------------------------------------------- encoding

def test_train_sample_layout_and_labels(tok):
    src = tok.encode("你好", add_special_tokens=False)
    tgt = tok.encode("本喵在这里喵～", add_special_tokens=False)
    ids, labels, cut = encode_train(tok, "你好", "本喵在这里喵～", 512, 512)
    assert ids == src + [GMASK, SOP] + tgt + [EOP] and not cut
    sop = ids.index(SOP)
    assert labels[:sop] == [-100] * sop and -100 not in labels[sop:]
    assert labels[sop:] == ids[sop:]
    assert encode_prompt(tok, "你好", 512) == src + [GMASK, SOP]
    assert tok.encode("你好") == encode_prompt(tok, "你好", 512)  # same as the tokenizer's own prompt form


def test_truncation_keeps_special_tokens_and_stated_lengths(tok):
    prompt, answer = "一二三四五六七八九十" * 5, "甲乙丙丁戊己庚辛壬癸" * 5
    src = tok.encode(prompt, add_special_tokens=False)
    tgt = tok.encode(answer, add_special_tokens=False)
    assert len(src) > 10 and len(tgt) > 8
    ids, labels, cut = encode_train(tok, prompt, answer, 10, 8)
    # the study's budget: source max_source_length - 2 (+ [gMASK] <sop>), target max_target_length - 1 (+ <eop>)
    assert cut and ids == src[:8] + [GMASK, SOP] + tgt[:7] + [EOP]
    assert len(ids) == 10 + 8 and labels == [-100] * 9 + [SOP] + tgt[:7] + [EOP]
    assert encode_prompt(tok, prompt, 10) == src[:8] + [GMASK, SOP]
    ids, _, cut = encode_train(tok, "短", "短", 10, 8)
    assert not cut


def test_expand_history_gives_one_sample_per_answer(tmp_path, tok):
    d = write_dataset(tmp_path, [rec("q2", "a2", [["q0", "a0"], ["q1", "a1"]]), rec("x", "y")])
    samples, report = build_train_samples(tok, ["d"], d, seed=None, expand_history=True)
    expected = [("q0", "a0"), ("[Round 0]\n问：q0\n答：a0\n[Round 1]\n问：q1\n答：", "a1"),
                ("[Round 0]\n问：q0\n答：a0\n[Round 1]\n问：q1\n答：a1\n[Round 2]\n问：q2\n答：", "a2"), ("x", "y")]
    assert len(samples) == 4 and report["samples"] == 4
    for sample, (prompt, answer) in zip(samples, expected):
        assert sample["input_ids"] == encode_train(tok, prompt, answer, 512, 512)[0]
    samples, _ = build_train_samples(tok, ["d"], d, seed=None)
    assert len(samples) == 2 and samples[0]["input_ids"] == encode_train(tok, expected[2][0], "a2", 512, 512)[0]


def test_eval_samples_keep_file_order_and_first_n(tmp_path, tok):
    d = write_dataset(tmp_path, [rec(f"问题{i}", f"答案{i}") for i in range(6)] + [rec("", "空")])
    out = build_eval_samples(tok, "d", d, max_samples=4, max_source_length=64)
    assert [s["index"] for s in out] == [0, 1, 2, 3]
    assert out[2]["prompt"] == "问题2" and out[2]["label"] == "答案2"
    assert out[2]["input_ids"] == encode_prompt(tok, "问题2", 64)


# ---------------------------------------------------------------- padding

def test_collate_train_right_pads_with_ignored_labels():
    batch = collate_train([{"input_ids": [11, GMASK, SOP, 20, EOP], "labels": [-100, -100, SOP, 20, EOP]},
                           {"input_ids": [GMASK, SOP, EOP], "labels": [-100, SOP, EOP]}], PAD)
    assert batch["input_ids"].tolist() == [[11, GMASK, SOP, 20, EOP], [GMASK, SOP, EOP, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, SOP, 20, EOP], [-100, SOP, EOP, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


# ---------------------------------------------------------------- batch planning

@pytest.mark.parametrize("group", [True, False])
def test_global_batches_cover_every_index_once_across_ranks(group):
    lengths = [(i * 37) % 101 for i in range(103)]
    for epoch in range(2):
        batches = global_batches(lengths, 12, seed=3, epoch=epoch, group_by_length=group)
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert [len(b) for b in batches] == [12] * 8 + [7]
        for world in (1, 2, 3):
            shares = [[rank_share(b, r, world) for b in batches] for r in range(world)]
            seen = sorted(i for r in range(world) for b in shares[r] for i in b)
            assert seen == list(range(103))
            for k, b in enumerate(batches):  # a single process with batch b*W sees the union of the shares
                assert sorted(i for r in range(world) for i in shares[r][k]) == sorted(b)
    assert global_batches(lengths, 12, 3, 0, group) == global_batches(lengths, 12, 3, 0, group)
    assert global_batches(lengths, 12, 3, 0, group) != global_batches(lengths, 12, 3, 1, group)


def test_length_grouping_puts_similar_lengths_together():
    lengths = list(range(1000))
    grouped = global_batches(lengths, 10, seed=0, epoch=0, group_by_length=True, mega_batches=100)
    plain = global_batches(lengths, 10, seed=0, epoch=0, group_by_length=False)
    spread = lambda bs: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs)
    assert spread(grouped) < spread(plain) / 10
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)  # one mega-chunk sorted by length, then the batches shuffled


# ---------------------------------------------------------------- validation

def test_malformed_json_names_line_and_column(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]'
    d = write_dataset(tmp_path, [], text=text)
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 3, column 23"):
        load_records(["d"], d)


def test_malformed_jsonl_names_line(tmp_path):
    d = write_dataset(tmp_path, [], file_name="d.jsonl", text='{"instruction": "a", "output": "b"}\n{oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: invalid JSON at line 2, column 2"):
        load_records(["d"], d)


def test_a_jsonl_line_may_hold_unicode_line_separators(tmp_path):
    """U+2028 / U+2029 / U+0085 are text inside a JSON string (json.dumps(ensure_ascii=False) writes them as they
    are); only "\n" ends a record."""
    answer = "one\u2028two\u2029three\x85four"
    d = write_dataset(tmp_path, [rec("q", answer), rec("q2", "a2")], file_name="d.jsonl")
    records, _ = load_records(["d"], d, seed=None)
    assert [r["response"] for r in records] == [answer, "a2"]


def test_a_file_that_is_not_utf8_names_byte_and_line(tmp_path):
    d = write_dataset(tmp_path, [], file_name="d.jsonl", text="", sha1=False)
    (d / "d.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: not UTF-8 text \(byte 53, line 2: b'\\xff'\); save the file as"):
        load_records(["d"], d)


def test_jsonl_loads(tmp_path):
    d = write_dataset(tmp_path, [rec("q", "a"), rec("q2", "a2", [["h", "g"]])], file_name="d.jsonl")
    records, _ = load_records(["d"], d, seed=None)
    assert [r["prompt"] for r in records] == ["q", "q2"] and records[1]["history"] == [["h", "g"]]


@pytest.mark.parametrize("bad, message", [
    (["not", "an", "object"], r"record 1 is a list, not an object"),
    ({"instruction": "q"}, r"record 1 lacks field 'output'"),
    ({"output": "a"}, r"record 1 lacks field 'instruction'"),
    ({"instruction": "q", "output": 5}, r"record 1 field 'output' is a int, expected a string"),
    ({"instruction": "q", "output": "a", "history": "h"}, r"record 1 field 'history' is a str; history must be a list"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"record 1 field 'history' turn 0 is"),
    ({"instruction": "q[gMASK]", "output": "a"}, r"record 1 field 'instruction' contains the special token '\[gM"),
    ({"instruction": "q", "output": "a<eop>"}, r"record 1 field 'output' contains the special token '<eop>'"),
    ({"instruction": "q", "input": "<pad>", "output": "a"}, r"record 1 field 'input' contains the special token '<pa"),
    ({"instruction": "q", "output": "a", "history": [["x", "<sop>"]]}, r"record 1 field 'history' turn 0 contains"),
])
def test_bad_records_are_errors_or_skipped_and_counted(tmp_path, bad, message):
    d = write_dataset(tmp_path, [rec("q0", "a0"), bad, rec("q2", "a2")])
    with pytest.raises(DataError, match=r"d\.json: " + message):
        load_records(["d"], d)
    records, report = load_records(["d"], d, seed=None, skip_bad_records=True)
    assert [r["source"] for r in records] == [("d", 0), ("d", 2)]
    assert report["datasets"]["d"]["skipped_bad"] == 1 and report["datasets"]["d"]["kept"] == 2


def test_empty_instruction_or_output_is_dropped_and_counted(tmp_path, tok):
    d = write_dataset(tmp_path, [rec("q", "a"), rec("", "a"), rec("q", ""), {"instruction": None, "output": "a"}])
    records, report = load_records(["d"], d)
    assert [r["source"] for r in records] == [("d", 0)]
    assert report["datasets"]["d"]["dropped_empty"] == 3 and report["datasets"]["d"]["read"] == 4
    samples, report = build_train_samples(tok, ["d"], d)
    assert len(samples) == 1 and "dropped empty 3" in format_report(report)


def test_sha1_mismatch_and_unknown_name(tmp_path):
    d = write_dataset(tmp_path, [rec("q", "a")])
    (d / "d.json").write_text(json.dumps([rec("q", "changed")]))
    with pytest.raises(DataError, match=r"sha1 of .*d\.json is [0-9a-f]{40} but dataset_info\.json says"):
        load_records(["d"], d)
    with pytest.raises(DataError, match=r"unknown dataset 'nope'.*known: d"):
        load_records(["nope"], d)


def test_max_samples_keeps_first_n_and_mixing_is_seeded(tmp_path):
    write_dataset(tmp_path, [rec(f"a{i}", "x") for i in range(30)], name="a", file_name="a.json")
    write_dataset(tmp_path, [rec(f"b{i}", "x") for i in range(30)], name="b", file_name="b.json")
    first, _ = load_records(["a", "b"], tmp_path, max_samples=10, seed=1)
    again, _ = load_records(["a", "b"], tmp_path, max_samples=10, seed=1)
    other, _ = load_records(["a", "b"], tmp_path, max_samples=10, seed=2)
    assert first == again and first != other
    assert sorted(r["prompt"] for r in first) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    ordered, _ = load_records(["a", "b"], tmp_path, max_samples=10, seed=None)
    assert [r["prompt"] for r in ordered] == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]


def test_cli_exit_codes(tmp_path, capsys):
    from data.__main__ import main

    d = write_dataset(tmp_path, [rec("q", "a"), {"instruction": "q"}])
    bad = subprocess.run([sys.executable, "-m", "data", "--dataset", "d", "--dataset-dir", str(d)],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "record 1 lacks field 'output'" in bad.stderr and "Traceback" not in bad.stderr
    assert main(["--dataset", "d", "--dataset-dir", str(d), "--skip-bad-records"]) == 0
    out = capsys.readouterr().out
    assert "skipped bad 1" in out and "truncated: source 0" in out and "     8       8  <sop>" in out


def test_cli_read_in_part_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m data --dataset roleplay_all_train | head -1", shell=True, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("roleplay_all_train: 2000 in") and done.stderr == ""


# ---------------------------------------------------------------- bundled demo and shared data

def test_demo_data_is_registered_and_tokenizes_short(tok):
    info = json.loads((DEMO_DIR / "dataset_info.json").read_text())
    assert set(info) == {"roleplay_all_train", "roleplay_all_test", "alpaca_gpt4_zh", "chat_aux_zh"}
    samples, report = build_train_samples(tok, ["roleplay_all_train"], DEMO_DIR)
    assert report["records"] == 2000 and report["truncated"] == 0
    lengths = sorted(len(s["input_ids"]) for s in samples)
    assert lengths[len(lengths) // 2] < 128 and lengths[-1] <= 256
    train, _ = load_records(["roleplay_all_train"], DEMO_DIR, seed=None)
    test, _ = load_records(["roleplay_all_test"], DEMO_DIR, seed=None)
    assert not {(r["prompt"], r["response"]) for r in train} & {(r["prompt"], r["response"]) for r in test}
    alpaca, _ = load_records(["alpaca_gpt4_zh"], DEMO_DIR, seed=None)
    aux, _ = load_records(["chat_aux_zh"], DEMO_DIR, seed=None)
    evaluated = {(r["prompt"], r["response"]) for r in alpaca[:100]}
    aux_turns = {(q, a) for r in aux for q, a in r["history"] + [[r["prompt"], r["response"]]]}
    assert len(alpaca) == 1500 and len(aux) == 600 and not evaluated & aux_turns
    assert tok.decode(tok.encode("你好\n  世界", add_special_tokens=False)) == "你好\n  世界"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_data_loads_and_tokenizes(tok):
    info = json.loads((SHARED_DATA / "dataset_info.json").read_text())
    for name in info:
        samples, report = build_train_samples(tok, [name], SHARED_DATA, max_samples=200)
        assert report["datasets"][name]["skipped_bad"] == 0 and len(samples) > 0, name
        for s in samples:
            sop = s["input_ids"].index(SOP)
            assert s["input_ids"][sop - 1] == GMASK and s["labels"][:sop] == [-100] * sop
