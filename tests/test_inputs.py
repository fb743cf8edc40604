"""Every file a command reads, damaged or hand-edited: one line naming the file and the fix, or a correct load.

Two parts. The kinds of bad input a user trial found, each through the documented command (evaluate.py,
python -m data, python -m adapters, train.py). Then a seeded mutation fuzz over each reader: truncations, byte
flips, JSON values of the wrong type, deep nesting, huge numbers, invalid UTF-8, safetensors header edits. Every
outcome must be the project's InputError naming a file of the case, or a load whose result holds what the reader
promises (float, finite tensors of the declared shapes; records of strings that the tokenizer takes).

    FUZZ_CASES=3000 pytest tests/test_inputs.py -k fuzz -s    # the long run: counts per reader and outcome
"""
import contextlib
import io
import json
import os
import random
import runpy
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
from adapters import AdapterSpec, apply_adapter, load_adapter, save_adapter
from conftest import REPO, script_env, write_bin_shards
from data import encode_records, load_records
from data.__main__ import main as data_main
from model.loader import load_model
from model.tokenizer import load_tokenizer
from runtime import checkpoint
from runtime.files import InputError, write_json
from runtime.process import rng_state
from study.grid import DEMO_BASE

RECORDS = [{"instruction": "你好", "input": "", "output": "你好，我在。", "history": [["早", "早上好"]]},
           {"instruction": "讲个笑话", "input": "", "output": "从前有座山。", "history": []}]
EVAL_FLAGS = ["--dataset", "d", "--max-samples", "1", "--max-length", "24", "--max-source-length", "16"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """The intact inputs, built once: the demo's base model, a LoRA and a P-Tuning adapter on it, a dataset."""
    root = tmp_path_factory.mktemp("made")
    shutil.copytree(DEMO_BASE, root / "model")
    for method in ("lora", "ptuning"):
        spec = AdapterSpec(method, "qkv", [5], pre_seq_len=4)
        save_adapter(apply_adapter(load_model(root / "model"), spec), spec, root / method)
    write_dataset(root / "data", json.dumps(RECORDS, ensure_ascii=False))
    return {name: root / name for name in ("model", "lora", "ptuning", "data")}


def write_dataset(d: Path, text: str, suffix: str = ".json", entry: dict | None = None):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"d{suffix}").write_bytes(text.encode("utf-8", "surrogatepass"))
    write_json(d / "dataset_info.json", {"d": entry or {"file_name": f"d{suffix}"}})


def edit_json(path: Path, change):
    content = json.loads(path.read_text(encoding="utf-8"))
    change(content)
    path.write_text(json.dumps(content), encoding="utf-8")


def edit_tensors(path: Path, change):
    save_file({k: change(t) for k, t in load_file(path).items()}, str(path))


def relabel_as_int32(path: Path):
    """Rewrite a safetensors header so that its F32 tensors claim to be I32 (the same bytes)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].replace(b'"F32"', b'"I32"')
    path.write_bytes(raw[:8] + header + raw[8 + n:])


def peft_bin_of_lists(d: Path):
    """A PEFT adapter directory whose adapter_model.bin holds lists, not tensors."""
    (d / "adapter.json").unlink()
    keys = list(load_file(d / "adapter_model.safetensors"))
    (d / "adapter_model.safetensors").unlink()
    torch.save({k: [0.0, 1.0] for k in keys}, d / "adapter_model.bin")


def int8_base(d: Path):
    shard = next(d.glob("model-*.safetensors"))
    edit_tensors(shard, lambda t: t.to(torch.int8) if t.dim() == 2 else t)


def shard_as_directory(d: Path):
    shard = next(d.glob("model-*.safetensors"))
    shard.unlink()
    shard.mkdir()


# name -> (what the user damaged: "data", "model", "lora" or "ptuning"; the damage; the command; words the one line
# holds beside the damaged file's name, or None where the input is valid and must be read)
KINDS = {
    "nested JSON": ("data", lambda d: write_dataset(d, "[" * 100_000 + "]" * 100_000), "evaluate", "nested too deep"),
    "columns a list": ("data", lambda d: edit_json(d / "dataset_info.json", lambda c: c["d"].update(
        columns=["instruction", "output"])), "data", '"columns" as a list'),
    "columns with a list": ("data", lambda d: edit_json(d / "dataset_info.json", lambda c: c["d"].update(
        columns={"prompt": ["instruction"]})), "data", "give a field name"),
    "history true": ("data", lambda d: edit_json(d / "dataset_info.json", lambda c: c["d"].update(
        columns={"history": True})), "data", "role 'history' to true"),
    "file_sha1 0": ("data", lambda d: edit_json(d / "dataset_info.json", lambda c: c["d"].update(file_sha1=0)),
                    "data", "not 40 hex digits"),
    "lone surrogate": ("data", lambda d: write_dataset(d, json.dumps(RECORDS).replace("\\u4f60", "\\ud800", 1)),
                       "evaluate", "half of a UTF-16 pair"),
    "not UTF-8 data": ("data", lambda d: write_dataset(d, json.dumps(RECORDS)[:-2] + "\udcff]"), "data",
                       "not UTF-8 text"),
    "huge integer": ("data", lambda d: write_dataset(d, '[{"instruction": ' + "9" * 5000 + "}]"), "evaluate",
                     "integer string conversion"),
    "U+2028 in JSONL": ("data", lambda d: write_dataset(d, "\n".join(
        json.dumps({**r, "output": r["output"] + "\u2028"}, ensure_ascii=False) for r in RECORDS), ".jsonl"),
                        "evaluate", None),
    "truncated adapter (evaluate)": ("lora", lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "evaluate", "not a readable safetensors file"),
    "truncated adapter (merge)": ("lora", lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "adapters", "not a readable safetensors file"),
    "truncated adapter (--peft-bin)": ("lora", lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "peft-bin", "not a readable safetensors file"),
    "adapter_model.bin of lists": ("lora", peft_bin_of_lists, "evaluate", "not a state dict"),
    "no base_model": ("lora", lambda d: edit_json(d / "adapter.json", lambda c: c.pop("base_model")), "evaluate",
                      "base_model missing"),
    "target null": ("lora", lambda d: edit_json(d / "adapter.json", lambda c: c["settings"].update(target=None)),
                    "evaluate", "target is None"),
    "layers all": ("lora", lambda d: edit_json(d / "adapter.json", lambda c: c["settings"].update(layers="all")),
                   "evaluate", "layers is 'all'"),
    "pre_seq_len 10^7": ("ptuning", lambda d: edit_json(d / "adapter.json", lambda c: c["settings"].update(
        pre_seq_len=10 ** 7)), "evaluate", "pre_seq_len is 10000000, expected a whole number 1-1024"),
    "garbage tokenizer": ("model", lambda d: (d / "ice_text.model").write_bytes(b"\x00garbage" * 100), "evaluate",
                          "not a sentencepiece model"),
    "heads a string": ("model", lambda d: edit_json(d / "config.json", lambda c: c.update(num_attention_heads="4")),
                       "evaluate", "num_attention_heads is '4', expected int"),
    "weight_map null": ("model", lambda d: edit_json(d / "model.safetensors.index.json", lambda c: c.update(
        weight_map=None)), "evaluate", '"weight_map" must map'),
    "relabelled as I32": ("lora", lambda d: relabel_as_int32(d / "adapter_model.safetensors"), "evaluate",
                          "adapter tensors are floats"),
    "integer adapter": ("lora", lambda d: edit_tensors(d / "adapter_model.safetensors", lambda t: t.to(torch.int32)),
                        "evaluate", "adapter tensors are floats"),
    "NaN adapter": ("lora", lambda d: edit_tensors(d / "adapter_model.safetensors", lambda t: t * float("nan")),
                    "evaluate", "holds NaN or inf"),
    "int8 base": ("model", int8_base, "evaluate", "base weights are floats"),
    "epsilon 64": ("model", lambda d: edit_json(d / "config.json", lambda c: c.update(layernorm_epsilon=64)),
                   "evaluate", "layernorm_epsilon is 64"),
    "adapter.json not JSON": ("lora", lambda d: (d / "adapter.json").write_text('{"method": }'), "evaluate",
                              "invalid JSON at line 1, column 12"),
    "config.json not JSON": ("model", lambda d: (d / "config.json").write_text('{"hidden_size": }'), "evaluate",
                             "invalid JSON at line 1, column 17"),
    "config.json not UTF-8": ("model", lambda d: (d / "config.json").write_bytes(b'{"x": "\xff"}'), "evaluate",
                              "not UTF-8 text (byte 7, line 1"),
    "shard a directory": ("model", shard_as_directory, "evaluate", "not a file in the directory"),
    "adapter weights a directory": ("lora", lambda d: ((d / "adapter_model.safetensors").unlink(),
                                                       (d / "adapter_model.safetensors").mkdir()),
                                    "evaluate", "a directory, where the adapter's tensors should be"),
}


def test_from_predictions_reads_each_line_checked(tmp_path, capsys):
    """evaluate.py --from-predictions on a file a hand edited: a record without its index, a line that is not
    JSON. One line naming the file and the record or line, exit 2, nothing written."""
    for lines, words in ([{"predict": "a", "label": "b"}], "record 0 is not a sample's index"), (
            [{"index": 0, "predict": "a", "label": "b"}, "{"], "invalid JSON at line 2"):
        f = tmp_path / "generated_predictions.jsonl"
        f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--from-predictions", str(f)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and str(f) in err and words in err, err
        assert not (tmp_path / "metrics.json").exists()


def run_command(command: str, made: dict, case: Path, damaged: str) -> tuple[int, str]:
    """The documented command on the case's files (the damaged one in `case`, the others intact) in this process:
    -> (exit code, stderr)."""
    where = {name: case if name == damaged else path for name, path in made.items()}
    adapter = where["ptuning"] if damaged == "ptuning" else where["lora"]
    if command == "data":
        return data_main(["--dataset", "d", "--dataset-dir", str(where["data"])]), ""
    if command == "evaluate":
        flags = ["--model", str(where["model"]), "--dataset-dir", str(where["data"]), *EVAL_FLAGS,
                 "--output-dir", str(case.parent / "eval")]
        if damaged in ("lora", "ptuning"):
            flags += ["--run", str(adapter)]
        try:
            evaluate.main(flags)
        except SystemExit as e:
            return e.code, ""
        return 0, ""
    argv = ["--peft-bin", str(adapter)] if command == "peft-bin" else \
        ["--model", str(where["model"]), "--adapter", str(adapter), "--output", str(case.parent / "merged")]
    old = sys.argv
    sys.argv = ["python -m adapters", *argv]
    try:
        runpy.run_module("adapters", run_name="__main__")
    except SystemExit as e:
        return e.code, ""
    finally:
        sys.argv = old
    return 0, ""


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_bad_input_is_one_line_naming_the_file(kind, made, tmp_path, capsys):
    damaged, damage, command, words = KINDS[kind]
    case = tmp_path / damaged
    shutil.copytree(made[damaged], case)
    damage(case)
    code, _ = run_command(command, made, case, damaged)
    out = capsys.readouterr()
    if words is None:  # valid input: read, and the run finished
        assert code == 0, out.err
        assert (tmp_path / "eval" / "d" / "metrics.json").is_file()
        return
    assert code in (1, 2), out.err
    assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err, out.err
    assert str(case) in out.err and words in out.err, out.err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_train_reads_the_same_way(made, tmp_path):
    """train.py: a record with a lone surrogate, a file that is not UTF-8, and a dataset whose records are all
    empty, each one line naming the file or the flag, exit 1."""
    cases = {"surrogate": (json.dumps(RECORDS).replace("\\u4f60", "\\ud800", 1), "half of a UTF-16 pair"),
             "latin-1": (json.dumps(RECORDS)[:-2] + "\udcff]", "not UTF-8 text"),
             "empty": (json.dumps([{"instruction": "", "output": ""}] * 3), "gave no training samples")}
    for name, (text, words) in cases.items():
        write_dataset(tmp_path / name, text)
        done = subprocess.run([sys.executable, "train.py", "--model", str(made["model"]), "--dataset", "d",
                               "--dataset-dir", str(tmp_path / name), "--max-steps", "1",
                               "--output-dir", str(tmp_path / f"out-{name}")],
                              cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    out = tmp_path / "out-damaged"  # a run directory whose run_config.json a hand broke, resumed
    out.mkdir()
    (out / "run_config.json").write_text('{"args": ')
    done = subprocess.run([sys.executable, "train.py", "--model", str(made["model"]), "--dataset", "d",
                           "--dataset-dir", str(made["data"]), "--max-steps", "1", "--output-dir", str(out),
                           "--resume"], cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    for words in ("run_config.json: invalid JSON at line 1", "pass --overwrite"):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr


# ---------------------------------------------------------------- the fuzz

FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "24"))  # per file below; the long run sets thousands in all
DEEP, HUGE = "@deep@", "@huge@"  # JSON values that json.dumps cannot write: put into the text afterwards
VALUES = [None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 63, 1e308, -1e-308, float("nan"), float("inf"), "", "x",
          "\ud800", "[gMASK]", [], {}, [1, "a"], {"a": 1}, DEEP, HUGE]
TINY = {"vocab_size": 4096, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 2, "inner_hidden_size": 32,
        "max_sequence_length": 64}  # the demo tokenizer's ids (the tiny preset's), a model of 140k weights


class Silent(Exception):
    """A reader accepted what it must not: the result breaks what the reader promises."""


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory) -> dict[str, Path]:
    """Small intact inputs: a model directory, LoRA / P-Tuning / PEFT adapters on it, datasets with and without a
    sha1 (with one, every change to the data file is caught by it)."""
    from model.chatglm import ChatGLMModel
    from model.config import ChatGLMConfig
    from model.loader import save_model
    from model.tokenizer import DEMO_TOKENIZER
    from runtime.files import file_digest
    root = tmp_path_factory.mktemp("fuzz")
    config = ChatGLMConfig(**{**vars(ChatGLMConfig.from_name("tiny")), **TINY})
    model = ChatGLMModel(config).init_weights(0)
    save_model(model.state_dict(), config, root / "model", tokenizer_file=DEMO_TOKENIZER)
    write_bin_shards(model.state_dict(), config, root / "bin", n_shards=2)  # the release's layout: pickles
    shutil.copyfile(DEMO_TOKENIZER, root / "bin" / "ice_text.model")
    for method in ("lora", "ptuning"):
        spec = AdapterSpec(method, "qkv", [1], pre_seq_len=4)
        save_adapter(apply_adapter(load_model(root / "model"), spec), spec, root / method)
    model, optimizer, scheduler, scaler = training_state(2)
    random.seed(0)  # the generators' states saved below: the same file, so the same mutations, in every session
    np.random.seed(0)
    state = {"step": 2, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "rng": [rng_state(torch.device("cpu"))], "world_size": 1}
    checkpoint.write(root / "checkpoints", 2, lambda d: d.mkdir(parents=True), optimizer.state_dict(), state)
    (root / "eval").mkdir()
    (root / "eval" / "generated_predictions.jsonl").write_text("".join(json.dumps(
        {"index": i, "prompt": r["instruction"], "label": r["output"], "predict": r["output"][:3]}, ensure_ascii=False)
        + "\n" for i, r in enumerate(RECORDS)), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate.recompute(root / "eval" / "generated_predictions.jsonl")  # its metrics.json and scores.jsonl
    shutil.copytree(root / "lora", root / "peft")
    (root / "peft" / "adapter.json").unlink()
    text = json.dumps(RECORDS, ensure_ascii=False)
    write_dataset(root / "json", text)
    write_dataset(root / "jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS), ".jsonl")
    write_dataset(root / "info", text, entry={"file_name": "d.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "history": "history"}})
    edit_json(root / "info" / "dataset_info.json", lambda c: c["d"].update(file_sha1=file_digest(
        root / "info" / "d.json", "sha1")))
    return {p.name: p for p in root.iterdir()}


def read_data(case: Path):
    records, _ = load_records(["d"], case)
    for r in records:
        texts = [r["prompt"], r["response"], *(t for turn in r["history"] for t in turn)]
        if not all(isinstance(t, str) for t in texts) or not all(len(turn) == 2 for turn in r["history"]):
            raise Silent(f"a record of other types: {r}")
    encode_records(load_tokenizer("tiny"), records)


def read_model(case: Path):
    model = load_model(case)
    load_tokenizer(case)
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point() or not torch.isfinite(p).all()]
    if bad or model.config.problems():
        raise Silent(f"loaded {bad[:3]} {model.config.problems()}")


def read_adapter_into(base: Path):
    def read(case: Path):
        model = load_model(base)
        spec = load_adapter(model, case)
        trained = [p for p in model.parameters() if p.requires_grad]
        if not trained or any(not p.is_floating_point() or not torch.isfinite(p).all() for p in trained):
            raise Silent("loaded tensors that are not finite floats")
        if spec.problems(model.config):
            raise Silent(f"loaded settings {spec.problems(model.config)}")
    return read


def mutate(data: bytes, name: str, rng: random.Random) -> bytes:
    """One random edit of a file's bytes: at the byte level, or for JSON its values, or a safetensors header's."""
    kinds = ["truncate", "flip", "insert", "delete", "repeat", "invalid utf-8"]
    if name.endswith((".json", ".jsonl")):
        kinds += ["json"] * 6
    if name.endswith(".safetensors"):
        kinds += ["header"] * 6
    if name.endswith((".pt", ".bin")):
        kinds += ["pickled"] * 6
    kind = rng.choice(kinds)
    at = rng.randrange(len(data) + 1)
    span = rng.randrange(1, 64)
    if kind == "truncate":
        return data[:at]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "insert":
        return data[:at] + rng.randbytes(span) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + span:]
    if kind == "repeat":
        return data[:at + span] + data[at:]
    if kind == "invalid utf-8":
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + data[at:]
    if kind == "json":
        lines = data.decode("utf-8").split("\n") if name.endswith(".jsonl") else [data.decode("utf-8")]
        i = rng.randrange(len(lines))
        if lines[i].strip():
            lines[i] = mutate_json(json.loads(lines[i]), rng)
        return "\n".join(lines).encode("utf-8", "surrogatepass")  # a raw surrogate: invalid UTF-8
    if kind == "pickled":  # a value of the saved dicts and lists replaced or deleted, saved again by torch
        content = torch.load(io.BytesIO(data), weights_only=True)
        containers = [(c, k) for c in walk(content) for k in (c if isinstance(c, dict) else range(len(c)))]
        container, key = rng.choice(containers)
        if isinstance(container, dict) and rng.random() < 0.3:
            del container[key]
        else:
            container[key] = rng.choice([v for v in VALUES if v not in (DEEP, HUGE)] + [torch.tensor([float("nan")])])
        out = io.BytesIO()
        torch.save(content, out)
        return out.getvalue()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    new = mutate_header(header, rng).encode("utf-8")
    return struct.pack("<Q", len(new)) + new + data[8 + n:]


def walk(value) -> list:
    """Every dict and list inside `value` (tuples are left whole: they cannot be changed in place)."""
    found, stack = [], [value]
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)):
            found.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
        elif isinstance(node, tuple):
            stack.extend(node)
    return found


def mutate_json(value, rng: random.Random) -> str:
    """Replace, delete or add one value somewhere in `value`; -> the JSON text."""
    nodes = [(None, None)]  # (container, key) of every value; (None, None): the whole
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            nodes.append((node, k))
            stack.append(v)
    container, key = rng.choice(nodes)
    new = rng.choice(VALUES + [[value]] if container is None else VALUES)
    if container is None:
        value = new
    elif rng.random() < 0.2 and isinstance(container, dict):
        del container[key]
    elif rng.random() < 0.2 and isinstance(container, dict):
        container[key + rng.choice(["_", "x", ""])] = new
    else:
        container[key] = new
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    return text.replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000).replace(json.dumps(HUGE), "7" * 5000)


def mutate_header(header: dict, rng: random.Random) -> str:
    """A safetensors header with one tensor's dtype, shape or byte offsets changed."""
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    what = rng.choice(["dtype", "shape", "offsets"])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "I64", "F8_E4M3"])
    elif what == "shape":
        shape = entry["shape"]
        choice = rng.randrange(4)
        entry["shape"] = ([*shape, 1] if choice == 0 else shape[::-1] if choice == 1 else [0] * len(shape)
                          if choice == 2 else [d * 2 for d in shape])
    else:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = [a, b + rng.choice([-4, -2, 2, 4, 10 ** 12])]
    return json.dumps(header)


def outcome(read, case: Path) -> str:
    """'error' (the project's error, naming a file of the case), 'load' (read, and the result holds what the reader
    promises), or what went wrong: 'traceback ...', 'silent ...', 'unnamed ...', 'hang'."""
    def timeout(*_):
        raise TimeoutError
    signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        read(case)
        return "load"
    except (InputError, FileNotFoundError) as e:
        return "error" if str(case) in str(e) and len(str(e).splitlines()) == 1 else f"unnamed {e}"
    except Silent as e:
        return f"silent {e}"
    except TimeoutError:
        return "hang"
    except Exception as e:  # noqa: BLE001 (what a traceback would show)
        return f"traceback {type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def training_state(step: int = 0):
    """A model, optimizer, schedule and loss scaler as train.py builds them, after `step` steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 100)
    for _ in range(step):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def resume_from(case: Path):
    """What train.py --resume reads: the latest checkpoint whose files read, then the state loaded into it."""
    latest, damaged = checkpoint.resumable(case)
    if latest is None:
        reasons = "; ".join(damaged)
        raise InputError(f"{case}: {reasons}")  # what train.py says: none can be read, and why
    state = checkpoint.load(latest, *training_state(), fsdp=False, rank=0, device=torch.device("cpu"))
    if state != {"step": 2}:
        raise Silent(f"counters {state}")


def recompute_scores(case: Path):
    """evaluate.py --from-predictions on the case's generated_predictions.jsonl (its printed line kept quiet)."""
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluate.recompute(case / "generated_predictions.jsonl")
    if not all(isinstance(metrics[k], float) for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")):
        raise Silent(f"scores {metrics}")


FUZZ = {"dataset_info.json": ("info", read_data), "d.json": ("json", read_data), "d.jsonl": ("jsonl", read_data),
        "config.json": ("model", read_model), "model.safetensors.index.json": ("model", read_model),
        "model-00001-of-00001.safetensors": ("model", read_model),
        "pytorch_model-00001-of-00002.bin": ("bin", read_model), "pytorch_model.bin.index.json": ("bin", read_model),
        "ice_text.model": ("model", read_model),
        "lora/adapter.json": ("lora", None), "lora/adapter_model.safetensors": ("lora", None),
        "ptuning/adapter.json": ("ptuning", None), "ptuning/adapter_model.safetensors": ("ptuning", None),
        "peft/adapter_config.json": ("peft", None), "peft/adapter_model.safetensors": ("peft", None),
        "step-2/trainer_state.pt": ("checkpoints", resume_from), "step-2/optimizer.pt": ("checkpoints", resume_from),
        "eval/generated_predictions.jsonl": ("eval", recompute_scores), "eval/metrics.json": ("eval", recompute_scores),
        "eval/scores.jsonl": ("eval", recompute_scores)}


@pytest.mark.parametrize("target", list(FUZZ))
def test_fuzz(target, fuzz_inputs, tmp_path):
    """FUZZ_CASES seeded mutations of one file: none ends in a traceback, a hang, an error that names no file of
    the case, or a load that breaks the reader's promise."""
    directory, read = FUZZ[target]
    read = read or read_adapter_into(fuzz_inputs["model"])
    name = Path(target).name
    rng = random.Random(f"{target}")
    counts, bad = Counter(), []
    for i in range(FUZZ_CASES):
        case = tmp_path / f"case-{i}"
        shutil.copytree(fuzz_inputs[directory], case)
        file = case / (target if directory == "checkpoints" else name)
        file.write_bytes(mutate(file.read_bytes(), name, rng))
        result = outcome(read, case)
        counts[result.split()[0]] += 1
        if result.split()[0] not in ("error", "load"):
            bad.append(f"case {i}: {result}")
        shutil.rmtree(case)
    print(f"\n{target}: {FUZZ_CASES} mutations: {dict(counts)}")
    assert not bad, "\n".join(bad[:20])
