"""launch.sh: the id -> arguments mapping of --dry-run against the study's grid (../shared/docs/experiment.md), bad
input refused before anything runs, and real launches on a tiny checkpoint: the lock, reruns as the fingerprint
says, Ctrl-C then resume, the demo's base model."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapters import AdapterSpec, apply_adapter, read_adapter, save_adapter, write_peft_bin
from conftest import REPO
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.loader import save_model
from model.tokenizer import DEMO_TOKENIZER
from runtime import checkpoint
from runtime.files import file_digest
from runtime.machine import has_avx2
from study import demo_base, fingerprint
from study.grid import EVAL_SETS
from study.rundir import CHECKPOINTS

EXPERIMENT = REPO.parent / "shared" / "docs" / "experiment.md"

# The grid as experiment.md writes it (id, method, trains, layers, aux); checked against the file when present.
GRID = """
| 0 | none (base model) | - | - | - |
| 1 | Freeze | mlp | 25-27 | no |
| 2 | Freeze | mlp | 25-27 | yes |
| 3 | Freeze | mlp | 0-2 | no |
| 4 | Freeze | mlp | 0-2 | yes |
| 5 | Freeze | qkv | 25-27 | no |
| 6 | Freeze | qkv | 25-27 | yes |
| 7 | Freeze | qkv | 0-2 | no |
| 8 | Freeze | qkv | 0-2 | yes |
| 9 | P-Tuning v2 | prefix encoder | - | no |
| 10 | P-Tuning v2 | prefix encoder | - | yes |
| 11 | LoRA | mlp | 25-27 | no |
| 12 | LoRA | mlp | 25-27 | yes |
| 13 | LoRA | mlp | 0-2 | no |
| 14 | LoRA | mlp | 0-2 | yes |
| 15 | LoRA | mlp | 0-27 | no |
| 16 | LoRA | mlp | 0-27 | yes |
| 17 | LoRA | qkv | 25-27 | no |
| 18 | LoRA | qkv | 25-27 | yes |
| 19 | LoRA | qkv | 0-2 | no |
| 20 | LoRA | qkv | 0-2 | yes |
| 21 | LoRA | qkv | 0-27 | no |
| 22 | LoRA | qkv | 0-27 | yes |
"""
METHODS = {"none (base model)": None, "Freeze": "freeze", "P-Tuning v2": "ptuning", "LoRA": "lora"}


def parse_grid(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    return rows


KNOBS = ("MODEL", "DATA_DIR", "NPROC", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "PARALLEL", "RUNS",
         "TRAIN_EXTRA", "EVAL_EXTRA", "PY", "SEEDS")


def launcher_env(**extra) -> dict:
    """The caller's environment without launch.sh's knobs, running on this Python (not on .venv/)."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    return {**env, "PY": sys.executable, **{k: str(v) for k, v in extra.items()}}


def dry_run(env_extra, *ids):
    out = subprocess.run(["bash", "launch.sh", "--dry-run", *map(str, ids)], cwd=REPO, capture_output=True,
                         text=True, env=launcher_env(**env_extra), check=True).stdout
    runs, current = {}, None
    for line in out.splitlines():
        m = re.match(r"# (\d+): (\S+)", line)
        if m:
            current = runs.setdefault(int(m.group(1)), {"name": m.group(2), "cmds": []})
        elif current is not None and line.strip():
            current["cmds"].append(line.split())
    return runs


def arg(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_seeds_run_every_row_once_per_seed(model_6b):
    out = subprocess.run(["bash", "launch.sh", "--dry-run", "0", "17"], cwd=REPO, capture_output=True, text=True,
                         env=launcher_env(MODEL=model_6b, SEEDS=3), check=True).stdout.splitlines()
    names = [line.split()[2] for line in out if line.startswith("# ")]
    assert names == ["0-base", "0-base-seed43", "0-base-seed44",
                     "17-lora-qkv-25-27", "17-lora-qkv-25-27-seed43", "17-lora-qkv-25-27-seed44"]
    cmds = [line.split() for line in out if "train.py" in line or "evaluate.py" in line]
    for cmd in cmds:
        seed = arg(cmd, "--seed")
        where = arg(cmd, "--output-dir")
        assert (seed is None) == ("seed4" not in where), cmd  # seed 42 is train.py's and evaluate.py's default
        if seed is not None:
            assert f"-seed{seed}" in where
    assert sum(arg(c, "--seed") == "44" for c in cmds) == 3  # 0's evaluation, 17's training and evaluation
    bad = subprocess.run(["bash", "launch.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         env=launcher_env(SEEDS="0"))
    assert bad.returncode == 2 and "SEEDS=0" in bad.stderr


def test_grid_copy_matches_experiment_md():
    if not EXPERIMENT.is_file():
        pytest.skip("../shared/docs/experiment.md not present")
    assert parse_grid(EXPERIMENT.read_text(encoding="utf-8")) == parse_grid(GRID)


@pytest.fixture
def model_6b(tmp_path):
    d = tmp_path / "chatglm-6b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ChatGLMConfig().to_dict()))
    return d


def test_every_id_maps_to_the_grid_on_the_released_depth(model_6b):
    runs = dry_run({"MODEL": str(model_6b), "NPROC": "1"})
    grid = parse_grid(GRID)
    assert sorted(runs) == list(range(23))
    for i, (method, trains, layers, aux) in grid.items():
        cmds = runs[i]["cmds"]
        train = [c for c in cmds if "train.py" in c]
        evals = [c for c in cmds if "evaluate.py" in c]
        assert len(evals) == 1
        ev = evals[0]
        assert arg(ev, "--dataset") == "roleplay_all_test,alpaca_gpt4_zh" and arg(ev, "--max-samples") == "100"
        assert arg(ev, "--model") == str(model_6b)
        if METHODS[method] is None:
            assert train == [] and "--run" not in ev
            continue
        (tr,) = train
        assert arg(tr, "--method") == METHODS[method]
        assert arg(ev, "--run") == arg(tr, "--output-dir")
        assert arg(tr, "--dataset") == ("roleplay_all_train,chat_aux_zh" if aux == "yes" else "roleplay_all_train")
        assert arg(tr, "--max-samples") == ("10000" if aux == "yes" else None)
        if METHODS[method] == "ptuning":
            assert arg(tr, "--layers") is None and arg(tr, "--target") is None
        else:
            assert arg(tr, "--target") == trains and arg(tr, "--layers") == layers
        # the study's settings are train.py's defaults: nothing overrides them on a real checkpoint
        assert arg(tr, "--lr") is None and arg(tr, "--epochs") is None
        # checkpoints by time for a resume after Ctrl-C, besides train.py's --save-steps
        assert arg(tr, "--save-minutes") == "30" and arg(tr, "--save-steps") is None
    assert len({r["name"] for r in runs.values()}) == 23


def test_a_dry_run_read_in_part_ends_quietly():
    done = subprocess.run("bash launch.sh --dry-run | head -1", shell=True, cwd=REPO, capture_output=True, text=True,
                          env=launcher_env(), timeout=60)
    assert done.stdout.startswith("# environment: OMP_NUM_THREADS=1") and done.stderr == ""


def test_the_demo_runs_on_the_committed_base_with_its_code_paths_pinned(tmp_path):
    def commands(*args, **env):
        return subprocess.run(["bash", "launch.sh", "--dry-run", *args], cwd=REPO, capture_output=True, text=True,
                              env=launcher_env(RUNS=tmp_path, **env), check=True).stdout.splitlines()
    pinned = "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2" if has_avx2() \
        else "OMP_NUM_THREADS=1"
    out = commands("17")
    assert out[0] == f"# environment: {pinned}"
    assert out[1].startswith("# the demo's base model: data/demo/base-model;")
    assert arg(out[-2].split(), "--model") == arg(out[-1].split(), "--model") == "data/demo/base-model"
    if has_avx2():  # the user's own choice of code path wins
        assert commands("17", ATEN_CPU_CAPABILITY="default")[0] == \
            "# environment: OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default MKL_CBWR=AVX2"
    out = commands("--retrain-base", "17")
    assert arg(out[2].split(), "--output-dir") == str(tmp_path / "base-train")
    assert arg(out[3].split(), "--output") == arg(out[-1].split(), "--model") == str(tmp_path / "base-model")


def test_multi_gpu_runs_through_torchrun(model_6b):
    runs = dry_run({"MODEL": str(model_6b), "NPROC": "8"}, 17)
    for cmd in runs[17]["cmds"]:
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "8"]


def test_multi_node_runs_through_a_c10d_rendezvous_per_command(model_6b):
    env = {"MODEL": str(model_6b), "NPROC": "8", "NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "node0:29500"}
    runs = dry_run(env, 0, 17)
    launch = [f"{sys.executable}", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
              "--node_rank", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29500", "--rdzv_id"]
    (evaluate_0,), (train, evaluate) = runs[0]["cmds"], runs[17]["cmds"]
    assert train[:14] == evaluate[:14] == evaluate_0[:14] == launch
    assert [c[14:16] for c in (evaluate_0, train, evaluate)] == [
        ["chatglm-0-base-eval", "evaluate.py"], ["chatglm-17-lora-qkv-25-27-train", "train.py"],
        ["chatglm-17-lora-qkv-25-27-eval", "evaluate.py"]]
    assert arg(dry_run({**env, "RDZV_ID": "job7"}, 17)[17]["cmds"][0], "--rdzv_id") == "job7-17-lora-qkv-25-27-train"
    for bad, says in (({"NODE_RANK": "2"}, "NODE_RANK=2"), ({"RDZV_ENDPOINT": ""}, "RDZV_ENDPOINT=(unset)"),
                      ({"PARALLEL": "2"}, "PARALLEL=2")):
        done = subprocess.run(["bash", "launch.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                              env=launcher_env(**{**env, **bad}))
        assert done.returncode == 2 and says in done.stderr, done.stderr


# ---------------------------------------------------------------- no torch, bad input

def test_dry_run_needs_no_torch(tmp_path, model_6b):
    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    for model, layers in ((None, "0-5"), (model_6b, "0-27")):  # the demo's tiny model, a checkpoint directory
        env = launcher_env(PYTHONPATH=blocker.parent, RUNS=tmp_path / "runs", **({"MODEL": model} if model else {}))
        assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode != 0
        done = subprocess.run(["bash", "launch.sh", "--dry-run", "--rerun-stale", "21"], cwd=REPO, text=True,
                              capture_output=True, env=env)
        assert done.returncode == 0, done.stderr
        assert f"--layers {layers}" in done.stdout and "evaluate.py" in done.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["no directory", "no config.json", "id 99", "id 23 in a dry run", "a word"])
def test_bad_model_or_id_is_one_line_before_anything_runs(tmp_path, case):
    (tmp_path / "empty").mkdir()
    env, args, expected = {
        "no directory": ({"MODEL": tmp_path / "missing"}, [], f"MODEL={tmp_path / 'missing'}: no such directory"),
        "no config.json": ({"MODEL": tmp_path / "empty"}, [], "no config.json in it"),
        "id 99": ({}, ["99"], "no run id 99 (ids are 0-22)"),
        "id 23 in a dry run": ({}, ["--dry-run", "23"], "no run id 23 (ids are 0-22)"),
        "a word": ({}, ["14", "all"], "unknown argument 'all'"),
    }[case]
    done = subprocess.run(["bash", "launch.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=launcher_env(RUNS=tmp_path / "runs", **env))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and expected in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained, not even the demo's base model


# ---------------------------------------------------------------- progress, on stub commands and a stub clock

def stub_launch(tmp_path: Path, rows: list[tuple[str, str, int, int]]) -> str:
    """launch.sh with `python -m study` and the runs' commands stubbed -> its output. rows: (name, what `study next`
    answers, seconds of its training (0: the plan has none), seconds of its evaluation). `date +%s` reads a file
    that the stub commands move on by their seconds, so every elapsed time and ETA is exact."""
    bin_dir, clock, plan, needs = tmp_path / "bin", tmp_path / "clock", tmp_path / "plan", tmp_path / "needs"
    bin_dir.mkdir()
    clock.write_text("0\n")
    tick = f"bash {tmp_path / 'tick'}"
    (tmp_path / "tick").write_text(f'echo $(($(cat {clock}) + $1)) >{clock}\n')
    lines = [f"runs\t{tmp_path / 'runs'}", "lanes\t1", "env\t", "compare\t0"]
    lines += ["\t".join(("run", name, str(tmp_path / name), f"{tick} {train}" if train else "-", f"{tick} {ev}",
                         str(tmp_path / f"{name}-train.log"), str(tmp_path / f"{name}-eval.log")))
              for name, _, train, ev in rows]
    plan.write_text("\n".join(lines) + "\n")
    needs.write_text("".join(f"{name} {what}\n" for name, what, _, _ in rows))
    py, date = bin_dir / "python", bin_dir / "date"
    # python -m study plan / next NAME from the files; anything else (evaluate.py --runs: the table) prints nothing
    py.write_text(f"""#!/usr/bin/env bash
case "$1 $2 $3" in
    "-m study plan") cat {plan} ;;
    "-m study next") awk -v name="$4" '$1 == name {{print $2}}' {needs} ;;
esac
""")
    date.write_text(f'#!/usr/bin/env bash\n[ "$1" = +%s ] && exec cat {clock}\nexec {shutil.which("date")} "$@"\n')
    py.chmod(0o755)
    date.chmod(0o755)
    env = launcher_env(PY=py, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["bash", "launch.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout


def test_the_eta_is_the_mean_training_times_the_trainings_left(tmp_path):
    out = stub_launch(tmp_path, [
        ("0-base", "eval", 0, 60),  # the base row only evaluates: no ETA yet
        ("1-a", "train", 600, 60),  # 660 s a training; the plan trains 4 more (what 2-b, 3-c need shows when reached)
        ("2-b", "eval", 600, 60),  # its adapter changed: evaluated again, out of the mean
        ("3-c", "done", 600, 60),
        ("4-d", "train", 900, 60),  # mean (660 + 960) / 2 = 810 s, one training left
        ("5-e", "train", 600, 60),
    ])
    progress = re.findall(r"\[launch\] run (\d)/6 (\S+): (.*) \(elapsed (\w+)(?:, ETA (\w+))?\)", out)
    assert progress == [
        ("1", "0-base", "done in 1m00s", "1m00s", ""),
        ("2", "1-a", "done in 11m00s", "12m00s", "44m00s"),
        ("3", "2-b", "done in 1m00s", "13m00s", "33m00s"),
        ("4", "3-c", "finished, skipped", "13m00s", "22m00s"),
        ("5", "4-d", "done in 16m00s", "29m00s", "13m30s"),
        ("6", "5-e", "done in 11m00s", "40m00s", ""),
    ], out


# ---------------------------------------------------------------- real launches on a tiny checkpoint (seconds each)

# id 11 = LoRA on the MLP of the last three layers: a few steps on 16 samples (none held out for validation:
# launch.sh's --val-size 200 is more than 16), 4 samples per evaluation set
RUN = "11-lora-mlp-3-5"
TRAIN_EXTRA = ("--precision fp32 --max-samples 16 --val-size 0 --batch-size 4 --max-source-length 48 "
               "--max-target-length 16 --save-steps 2 --max-steps ")
EVAL_EXTRA = "--precision fp32 --max-samples 4 --max-length 48 --max-source-length 40"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    config = ChatGLMConfig.from_name("tiny")
    return save_model(ChatGLMModel(config).init_weights(0).state_dict(), config,
                           tmp_path_factory.mktemp("tiny") / "base", tokenizer_file=DEMO_TOKENIZER)


def tiny_env(runs: Path, base: Path, steps: int) -> dict:
    return launcher_env(MODEL=base, RUNS=runs, DATA_DIR="data/demo", OMP_NUM_THREADS=1,
                        TRAIN_EXTRA=f"{TRAIN_EXTRA}{steps}", EVAL_EXTRA=EVAL_EXTRA)


def launch(env: dict, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "launch.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def attempts(log: Path) -> list[str]:
    return [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("=== ")]


def set_code(path: Path, code: str):
    """What fingerprint.py reads of a train_results.json / metrics.json: the code that made it."""
    record = json.loads(path.read_text(encoding="utf-8"))
    record["fingerprint"] = {**record.get("fingerprint", {}), "code": code}
    path.write_text(json.dumps(record), encoding="utf-8")


@pytest.mark.slow
def test_reruns_do_what_the_fingerprint_says(tmp_path, tiny_base):
    runs = tmp_path / "runs"
    env = tiny_env(runs, tiny_base, steps=4)
    run = runs / RUN
    results = [run / "train_results.json"] + [run / "eval" / s / "metrics.json" for s in EVAL_SETS]

    out = launch(env, "11").stdout
    assert f"[launch] run 1/1 {RUN}: done in" in out and "| 11 | lora |" in out
    assert len(attempts(run / "train.log")) == 1 and len(attempts(run / "eval.log")) == 1

    # the adapter changed after it was scored: evaluated again, not trained again
    adapter = load_file(run / "adapter_model.safetensors")
    save_file({k: v + 0.01 for k, v in adapter.items()}, run / "adapter_model.safetensors")
    out = launch(env, "11").stdout
    assert f"{RUN}: evaluating" in out and f"{RUN}: training" not in out
    assert len(attempts(run / "train.log")) == 1 and len(attempts(run / "eval.log")) == 2
    for m in results[1:]:
        assert json.loads(m.read_text())["adapter"]["sha256"] == fingerprint.adapter_sha256(run)

    code = fingerprint.code_fingerprint()
    for path in results:
        set_code(path, code)
    out = launch(env, "11").stdout
    assert f"[launch] run 1/1 {RUN}: finished, skipped" in out

    # made by other code: skipped until --rerun-stale, which trains it over
    set_code(run / "train_results.json", "other code")
    out = launch(env, "11").stdout
    assert f"{RUN}: finished, but by other code" in out and "bash launch.sh --rerun-stale" in out
    assert len(attempts(run / "train.log")) == 1
    out = launch(env, "--rerun-stale", "11").stdout
    assert f"{RUN}: training again" in out
    (first, second) = attempts(run / "train.log")
    assert first.endswith(" --resume") and second.endswith(" --overwrite")
    assert len(attempts(run / "eval.log")) == 3


def test_only_the_files_the_loader_reads_decide_whether_scores_are_current(tmp_path):
    """A launcher run scored with its LoRA adapter (run_needs reads these files, made as train.py and evaluate.py
    make them): files added beside the adapter leave it done; other tensors or settings make it evaluated again."""
    config = ChatGLMConfig.from_name("tiny")
    model = ChatGLMModel(config).init_weights(0)
    spec = AdapterSpec(method="lora", target="mlp", layers=[3, 4, 5], lora_rank=4)
    apply_adapter(model, spec)
    run = save_adapter(model, spec, tmp_path / "run")
    (run / "run.json").write_text(json.dumps({"method": "lora"}))
    (run / "train_results.json").write_text(json.dumps({"fingerprint": {"code": "c"}}))

    def score(sha256):
        for name in EVAL_SETS:
            (run / "eval" / name).mkdir(parents=True, exist_ok=True)
            metrics = {"adapter": {"sha256": sha256}, "fingerprint": {"code": "c"}}
            (run / "eval" / name / "metrics.json").write_text(json.dumps(metrics))

    score(fingerprint.adapter_sha256(run))
    assert fingerprint.run_needs(run, code="c") == "done"
    write_peft_bin(run)
    (run / "adapter_notes.txt").write_text("tried at lr 2e-4")
    assert fingerprint.run_needs(run, code="c") == "done"
    assert read_adapter(run, config)[1] == run / "adapter_model.safetensors"
    assert sorted(fingerprint.adapter_sha256(run)) == ["adapter.json", "adapter_model.safetensors"]
    # a record from before: every adapter* file of the directory, the .bin and the notes among them
    score({p.name: file_digest(p) for p in run.iterdir() if p.name.startswith("adapter")})
    assert fingerprint.run_needs(run, code="c") == "done"

    scored = (run / "adapter_model.safetensors").read_bytes()
    tensors = load_file(run / "adapter_model.safetensors")
    save_file({k: v + 0.01 for k, v in tensors.items()}, run / "adapter_model.safetensors")
    assert fingerprint.run_needs(run, code="c") == "eval"
    (run / "adapter_model.safetensors").write_bytes(scored)
    assert fingerprint.run_needs(run, code="c") == "done"
    meta = json.loads((run / "adapter.json").read_text())
    (run / "adapter.json").write_text(json.dumps({**meta, "settings": {**meta["settings"], "lora_alpha": 64.0}}))
    assert fingerprint.run_needs(run, code="c") == "eval"
    # without the safetensors file the loader reads the .bin: that is hashed now
    (run / "adapter.json").write_text(json.dumps(meta))
    (run / "adapter_model.safetensors").unlink()
    assert read_adapter(run, config)[1] == run / "adapter_model.bin"
    assert sorted(fingerprint.adapter_sha256(run)) == ["adapter.json", "adapter_model.bin"]


def live_processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "stat").read_text().split(") ")[-1][0] != "Z":
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in cmdline:
                    found.append(cmdline)
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_lock_then_ctrl_c_then_the_same_command_resumes(tmp_path, tiny_base):
    runs = tmp_path / "runs"
    env = tiny_env(runs, tiny_base, steps=300)
    run = runs / RUN
    first = subprocess.Popen(["bash", "launch.sh", "11"], cwd=REPO, env=env, start_new_session=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while checkpoint.latest(run / CHECKPOINTS) is None and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)

        # a second launcher on the same runs directory refuses at once, naming the first
        second = subprocess.run(["bash", "launch.sh", "11"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1 and len(second.stderr.splitlines()) == 1, second.stderr
        assert f"{runs} is in use by another launcher (pid {first.pid}, since " in second.stderr
        assert "bash launch.sh 11)" in second.stderr

        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's foreground process group
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, err
    assert err.splitlines()[-1] == ("[launch] interrupted: the runs stopped; the same command resumes them "
                                    "(checkpoints are kept)")
    assert live_processes_mentioning(str(runs)) == []
    stopped_at = int(checkpoint.latest(run / CHECKPOINTS).name.split("-")[1])
    assert 2 <= stopped_at < 300 and not (run / "train_results.json").exists()

    out = launch(env, "11").stdout
    assert f"[launch] run 1/1 {RUN}: done in" in out
    log = (run / "train.log").read_text(encoding="utf-8")
    assert len(attempts(run / "train.log")) == 2  # the first attempt's lines are kept
    assert log.count("16 samples, 4 steps per epoch, 300 steps") == 2
    resumed = int(re.search(r"resuming at step (\d+)", log).group(1))
    assert resumed >= stopped_at
    assert json.loads((run / "train_results.json").read_text())["steps"] == 300


@pytest.mark.slow
def test_demo_retrains_its_base_model_then_runs_two_lanes(tmp_path):
    """`bash launch.sh --retrain-base` without MODEL, cut down by TRAIN_EXTRA / EVAL_EXTRA: the base model is
    trained with its progress on screen, exported to RUNS/base-model with its record, and ids 0 and 1 run on it
    side by side."""
    runs = tmp_path / "runs"
    env = launcher_env(RUNS=runs, OMP_NUM_THREADS=1, TRAIN_EXTRA="--max-steps 3 --max-samples 16 --val-size 4",
                       EVAL_EXTRA=EVAL_EXTRA)
    out = launch(env, "--retrain-base", "0", "1").stdout
    assert "[launch] training the demo's base model" in out and "full: 100%" in out  # train.py's bar on screen
    assert f"made again in {runs / 'base-model'}: other bits than the committed data/demo/base-model" in out
    demo_base.check(runs / "base-model")  # its made.json describes it
    assert len(attempts(runs / "base-train.log")) == 1
    assert json.loads((runs / "0-base" / "run.json").read_text())["commands"][0].split()[3] == str(runs / "base-model")
    counts = sorted(re.findall(r"\[launch\] run (\d)/2 ", out))
    assert counts == ["1", "2"], out  # one count shared by both lanes
    for name in ("0-base", "1-freeze-mlp-3-5"):
        assert (runs / name / "eval" / "alpaca_gpt4_zh" / "metrics.json").is_file()
    # launch.sh's --val-size 100 is more than 16 records: TRAIN_EXTRA's 4 replace it; the run validated
    assert json.loads((runs / "1-freeze-mlp-3-5" / "train_results.json").read_text())["best_val_step"] == 3
