"""What a user types: every numeric flag checked when parsed, options a method ignores, the model a script takes
without --model, adapters refused on other base weights, and Ctrl-C / OS errors as one line that keeps the work."""
import errno
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import train
from adapters import AdapterSpec, apply_adapter, load_adapter, save_adapter
from adapters.files import SKETCH_TOLERANCE, weights_sketch
from conftest import REPO, TRAIN_SMALL, script_env
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.loader import load_model, save_model
from runtime import checkpoint, files
from study import grid
from study.rundir import CHECKPOINTS, LOG


# ---------------------------------------------------------------- flags checked when parsed

@pytest.mark.parametrize("flag, bad", [
    ("--max-steps", "-5"), ("--epochs", "0"), ("--batch-size", "0"), ("--grad-accum", "0"), ("--lr", "0"),
    ("--warmup-steps", "-1"), ("--weight-decay", "-0.1"), ("--max-grad-norm", "-1"), ("--save-steps", "-1"),
    ("--save-minutes", "-1"), ("--logging-steps", "0"), ("--dist-timeout", "0"), ("--max-samples", "0"),
    ("--max-source-length", "1"), ("--max-target-length", "1"), ("--lora-rank", "0"), ("--lora-alpha", "0"),
    ("--lora-dropout", "1"), ("--pre-seq-len", "0"), ("--batch-size", "two"),
])
def test_train_refuses_a_bad_number(flag, bad, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", "tiny", flag, bad])
    assert e.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--max-grad-norm", "--save-minutes", "--dist-timeout",
                                  "--lora-alpha", "--lora-dropout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_train_refuses_nan_and_infinity(flag, value, capsys):
    """nan passes every comparison (nan <= 0 is False): each float flag checks finiteness first."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", "tiny", f"{flag}={value}"])  # "=": argparse would read -inf as a flag
    assert e.value.code == 2
    assert f"argument {flag}: expected a finite number, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--temperature", "--top-p", "--timeout-minutes"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_evaluate_refuses_nan_and_infinity(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--model", "tiny", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: expected a finite number, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("script, flag", [("bench/train.py", "--peak-tflops"), ("bench/gpu_check.py", "--budget")])
def test_the_benchmarks_refuse_nan(script, flag):
    done = subprocess.run([sys.executable, script, flag, "nan"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and f"argument {flag}: expected a finite number, got nan" in done.stderr


def test_train_accepts_the_documented_zeros():
    s = train.parse_args(["--model", "tiny", "--max-steps", "0", "--save-steps", "0", "--lora-dropout", "0",
                          "--warmup-steps", "0", "--max-grad-norm", "0"])
    assert (s.optim.max_steps, s.out.save_steps, s.adapter.lora_dropout, s.optim.max_grad_norm) == (0, 0, 0.0, 0.0)


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "0"], "--greedy"), (["--temperature", "-1"], "--greedy"), (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"), (["--batch-size", "0"], "--batch-size"), (["--max-samples", "0"], "--max-samples"),
    (["--max-length", "0"], "--max-length"), (["--timeout-minutes", "0"], "--timeout-minutes"),
])
def test_evaluate_refuses_a_bad_number(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--model", "tiny", *flags])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_greedy_needs_no_temperature():
    s = evaluate.parse_args(["--model", "tiny", "--greedy", "--temperature", "0", "--top-p", "1"])
    assert not s.gen.do_sample and s.gen.top_p == 1.0


@pytest.mark.parametrize("flags, ignored", [
    (["--method", "ptuning", "--target", "mlp"], "--target"), (["--method", "ptuning", "--layers", "2"], "--layers"),
    (["--method", "freeze", "--lora-rank", "4"], "--lora-rank"), (["--method", "lora", "--pre-seq-len", "8"],
                                                                   "--pre-seq-len"),
    (["--method", "full", "--layers", "all"], "--layers"), (["--method", "lora", "--prefix-projection"],
                                                            "--prefix-projection"),
])
def test_an_option_the_method_ignores_is_an_error(flags, ignored):
    with pytest.raises(ValueError, match=f"does not use {ignored}"):
        train.parse_args(["--model", "tiny", *flags])


def test_method_flags_left_unset_take_the_study_defaults():
    spec = train.parse_args(["--model", "chatglm-6b"]).adapter
    assert (spec.method, spec.target, spec.layers, spec.lora_rank, spec.lora_alpha, spec.lora_dropout) == \
        ("lora", "qkv", [25, 26, 27], 8, 32.0, 0.1)


# ---------------------------------------------------------------- the model without --model

def test_without_model_the_committed_demo_base_or_a_retrained_one(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MODEL", raising=False)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(grid, "DEMO_MODEL", tmp_path / "base-model")  # no retrained one: the committed one
    s = train.parse_args(["--method", "lora", "--target", "qkv", "--layers", "3", "--lr", "1e-4"])
    assert s.model == str(grid.DEMO_BASE) == "data/demo/base-model"
    assert (s.optim.lr, s.optim.epochs, s.optim.batch_size, s.run.precision) == (1e-4, 2, 16, "fp32")  # flags win
    assert "model: data/demo/base-model, the demo's base model" in capsys.readouterr().out
    (tmp_path / "base-model").mkdir()
    (tmp_path / "base-model" / "config.json").write_bytes((REPO / grid.DEMO_BASE / "config.json").read_bytes())
    # as if `bash launch.sh --retrain-base` made one
    assert train.parse_args([]).model == str(tmp_path / "base-model")
    assert evaluate.parse_args([]).load.model == str(tmp_path / "base-model")
    assert evaluate.parse_args(["--runs"]).load.model is None  # the table alone needs no model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grid, "DEMO_MODEL", "absent")
    assert train.parse_args([]).model == str(REPO / "data/demo/base-model")  # from elsewhere: the full path


def test_model_from_the_environment_keeps_the_study_settings(monkeypatch, capsys):
    monkeypatch.setenv("MODEL", "/data/chatglm-6b")
    monkeypatch.setattr(train, "load_config", lambda name: ChatGLMConfig())  # no such directory here
    s = train.parse_args(["--method", "lora"])
    assert s.model == "/data/chatglm-6b" and (s.optim.lr, s.optim.epochs, s.optim.batch_size) == (1e-5, 10, 8)
    assert "$MODEL = /data/chatglm-6b" in capsys.readouterr().out
    assert train.parse_args(["--model", "tiny"]).model == "tiny"


# ---------------------------------------------------------------- adapters and their base weights

def tiny_model(seed: int, dtype=torch.float32) -> ChatGLMModel:
    return ChatGLMModel(ChatGLMConfig.from_name("tiny")).init_weights(seed).to(dtype)


@pytest.mark.parametrize("method", ["lora", "freeze", "ptuning"])
def test_an_adapter_is_refused_on_other_base_weights(tmp_path, method):
    model = apply_adapter(tiny_model(0), AdapterSpec(method, "mlp", [4, 5]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # trained: Freeze's own tensors change and must not count as the base
    save_adapter(model, AdapterSpec(method, "mlp", [4, 5]), tmp_path)
    load_adapter(tiny_model(0, torch.bfloat16), tmp_path)  # the same base in another dtype
    with pytest.raises(ValueError, match="other base weights.*--force"):
        load_adapter(tiny_model(1), tmp_path)
    assert load_adapter(tiny_model(1), tmp_path, force=True).method == method


def test_an_adapter_loads_onto_its_base_stored_in_any_precision(tmp_path):
    """The base saved as fp32, fp16 and bf16 and loaded in each precision: the sketch stays within its tolerance
    (fp32 -> fp16 -> bf16 rounds some values twice, which broke a hash of bf16-rounded values)."""
    base = tiny_model(3)
    spec = AdapterSpec("lora", "qkv", [4, 5])
    save_adapter(apply_adapter(base, spec), spec, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "adapter.json").read_text())["base_model"]["weights"]
    for stored_as in (torch.float32, torch.float16, torch.bfloat16):
        state = {k: v.to(stored_as) for k, v in ChatGLMModel(base.config).init_weights(3).state_dict().items()}
        save_model(state, base.config, tmp_path / "base")
        for load_as in (torch.float32, torch.float16, torch.bfloat16):
            model = load_model(tmp_path / "base", load_as)
            off = max(abs(a - b) for got, want in zip(weights_sketch(model, stored["tensors"]), stored["sketch"])
                      for a, b in zip(got, want))
            assert (off == 0) == (stored_as == load_as == torch.float32) and off < SKETCH_TOLERANCE / 2
            assert load_adapter(model, tmp_path / "run").method == "lora"


def test_weights_files_get_the_mode_of_every_other_file(tmp_path):
    """safetensors creates its files 0600; a run's and a model's weights are as readable as their JSON files."""
    spec = AdapterSpec("lora", "qkv", [5])
    model = apply_adapter(tiny_model(0), spec)
    save_adapter(model, spec, tmp_path / "run")
    save_model(tiny_model(0).state_dict(), model.config, tmp_path / "model")
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.glob("*/*")}
    assert modes["run/adapter_model.safetensors"] == modes["run/adapter.json"] == modes["model/config.json"] == \
        modes["model/model-00001-of-00001.safetensors"]


def spoil(run, case: str):
    """One kind of damage or hand edit to a saved LoRA adapter."""
    meta_file, weights = run / "adapter.json", run / "adapter_model.safetensors"
    meta = json.loads(meta_file.read_text())
    tensors = load_file(weights)
    if case == "invalid JSON":
        meta_file.write_text('{"method": }')
    elif case == "no base_model":
        meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "base_model"}))
    elif case in ("target null", "layers all"):
        meta["settings"].update({"target": None} if case == "target null" else {"layers": "all"})
        meta_file.write_text(json.dumps(meta))
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "integer tensors":
        save_file({k: t.to(torch.int32) for k, t in tensors.items()}, str(weights))
    elif case == "NaN tensors":
        save_file({k: torch.full_like(t, float("nan")) for k, t in tensors.items()}, str(weights))


@pytest.mark.parametrize("case, message", [
    ("invalid JSON", "adapter.json: invalid JSON at line 1"), ("no base_model", "adapter.json: base_model missing"),
    ("target null", "adapter.json: settings target is None, expected one of"),
    ("layers all", "adapter.json: settings layers is 'all', expected a list of layer numbers"),
    ("truncated", "adapter_model.safetensors: not a readable safetensors file"),
    ("integer tensors", "is torch.int32; adapter tensors are floats"), ("NaN tensors", "holds NaN or inf")])
def test_a_damaged_or_hand_edited_adapter_is_one_line(tmp_path, capsys, case, message):
    spec = AdapterSpec("lora", "qkv", [5])
    save_adapter(apply_adapter(tiny_model(0), spec), spec, tmp_path / "run")
    spoil(tmp_path / "run", case)
    flags = ["--model", "tiny", "--run", str(tmp_path / "run"), "--max-samples", "1", "--dataset", "alpaca_gpt4_zh",
             "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and str(tmp_path / "run") in err and len(err.splitlines()) == 1
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_other_base_weights_unless_forced(tmp_path, capsys):
    spec = AdapterSpec("lora", "qkv", [5])
    save_adapter(apply_adapter(tiny_model(7), spec), spec, tmp_path / "run")
    flags = ["--model", "tiny", "--checkpoint", str(tmp_path / "run"), "--max-samples", "1", "--max-length", "24",
             "--max-source-length", "16", "--dataset", "alpaca_gpt4_zh", "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(flags)
    assert e.value.code == 2 and "other base weights" in capsys.readouterr().err
    evaluate.main(flags + ["--force"])
    assert (tmp_path / "eval" / "alpaca_gpt4_zh" / "metrics.json").is_file()


# ---------------------------------------------------------------- interrupts and OS errors

def wait_for(predicate, proc, timeout=120):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_in_train_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TRAIN_SMALL, "--method", "lora", "--max-steps", "300", "--batch-size", "2",
           "--save-steps", "3", "--logging-steps", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: checkpoint.latest(out / CHECKPOINTS) is not None, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: interrupted;") and "--resume" in last and "checkpoints/step-" in last
    step = int(last.split("checkpoints/step-")[1].split()[0])
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming at step {step}" in done.stdout
    assert [r["step"] for r in files.read_jsonl(out / LOG)] == list(range(1, 301))


@pytest.mark.slow
def test_ctrl_c_in_evaluate_keeps_finished_batches(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "evaluate.py", "--model", "tiny", "--dataset", "alpaca_gpt4_zh", "--max-samples", "64",
           "--batch-size", "1", "--max-length", "40", "--max-source-length", "24", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = lambda: [p for p in (out / "alpaca_gpt4_zh").glob("*.partial-*.jsonl") if p.stat().st_size > 0] \
        if (out / "alpaca_gpt4_zh").is_dir() else []
    wait_for(partial, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "interrupted" in stderr and "resumes" in stderr
    kept = sum(1 for line in partial()[0].read_text().splitlines() if line.strip())
    assert kept >= 1


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_last(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ('unexpected pos'); the run stops with an OSError that
    names the checkpoint being written, and the previous complete checkpoint stays loadable."""
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 2:  # the first checkpoint (optimizer.pt, trainer_state.pt) is written, the second is not
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    with pytest.raises(OSError) as e:
        train.main([*TRAIN_SMALL, "--method", "lora", "--max-steps", "6", "--batch-size", "2", "--save-steps", "2",
                    "--output-dir", str(out)])
    assert "step-4" in e.value.filename and "unexpected pos" in e.value.strerror
    assert checkpoint.latest(out / CHECKPOINTS) == out / CHECKPOINTS / "step-2"
    line = files.explain(e.value)
    assert line.startswith(str(out / "checkpoints" / "step-4")) and "\n" not in line


def test_explain_says_what_to_do():
    full = files.explain(OSError(errno.ENOSPC, "No space left on device", "runs/demo/run.json"))
    assert full.startswith("runs/demo/run.json: No space left on device") and "disk is full" in full
    denied = files.explain(PermissionError(errno.EACCES, "Permission denied", "nope/run"))
    assert "not writable" in denied
    read_only = files.explain(OSError(errno.EROFS, "Read-only file system", "/"))
    assert "not writable" in read_only and "full" not in read_only


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only: skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line(small_disk):
    out = small_disk / "run"  # full fine-tuning of the tiny model: its first checkpoint does not fit in 3 MiB
    done = subprocess.run([sys.executable, "train.py", *TRAIN_SMALL, "--method", "full", "--max-steps", "4",
                           "--batch-size", "2", "--save-steps", "2", "--output-dir", str(out)],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and "disk is full" in last and str(out) in last
