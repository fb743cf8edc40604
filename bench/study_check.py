"""The study check: the study's own path (launch.sh, train.py, evaluate.py) on a random ChatGLM-6B, in minutes on
one GPU, and from its figures an estimate of the whole grid on 8 x A100 and on one H100.

    python bench/study_check.py --out study_check          # one GPU; sized for 8 minutes, not yet run on one
    python bench/study_check.py --small --peak-tflops 1  # the same path on a tiny model on a CPU (its test)

Writes study_check/study_check.json and study_check/study_check.md. The stages:
- a random ChatGLM-6B in the released layout (model/loader.py save_model: sharded safetensors, index,
  config.json), bf16. The released tokenizer (ice_text.model, 130,344 pieces) is not in the repository, so the
  model directory carries the demo's (data/demo/ice_text.model, 4,096 pieces) and the config takes that
  tokenizer's special-token ids; every shape, the 130,528-row embedding and output layer included, is the 6B's.
  Token counts per sample are the demo tokenizer's, not the released one's;
- the load (train.py's build_model) and the save of one training checkpoint (train.py's save_checkpoint), timed
  in this process on row 17's adapter after one step;
- `bash launch.sh 0 9 17` with MODEL = that directory and short runs (TRAIN_EXTRA, EVAL_EXTRA below): training
  tokens/s and peak memory (train_results.json), MFU by bench/train.py's FLOP count per token at the measured
  mean sample length, evaluation time per sample, generated tokens/s (prefill and decode together: what
  evaluate.py records; bench/generate.py separates them) and the NLL pass (metrics.json);
- row 17's training stopped (Ctrl-C to the launcher) after its first checkpoint, the same command again resumes
  it; its adapter must equal, byte for byte, that of the same training run uninterrupted in another RUNS;
- the estimate: every grid row's training tokens (its samples as the study's command selects them, less those
  held out, times the epochs, times the measured tokens per sample) times its FLOPs per token, at the measured
  MFU of the target's peak bf16 FLOP/s (assumed to carry over from the GPU measured here); evaluations at the
  measured seconds per sample scaled by the ratio of peaks; plus one model load per training and per evaluation.
  The GPUs share the runs evenly (8 x A100: eight single-GPU runs side by side, as the study ran). Left out: the
  validation loss (the short runs here hold none out; the study's 200 every 500 steps). Random weights never end
  an answer early, so evaluation runs to --max-length: an upper bound.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from adapters import apply_adapter  # noqa: E402
from bench.train import PEAK_TFLOPS, random_batch, step_flops  # noqa: E402
from model.chatglm import ChatGLMModel  # noqa: E402
from model.config import ChatGLMConfig  # noqa: E402
from model.loader import save_model  # noqa: E402
from model.loss import n_targets  # noqa: E402
from model.tokenizer import DEMO_TOKENIZER  # noqa: E402
from runtime import checkpoint  # noqa: E402
from runtime.files import write_json  # noqa: E402
from runtime.flags import POSITIVE  # noqa: E402
from runtime.process import peak_memory_bytes  # noqa: E402
from study import training  # noqa: E402
from study.grid import EVAL_SAMPLES, EVAL_SETS, GRID, Plan  # noqa: E402
from study.rundir import CHECKPOINTS, EVAL, TRAIN_RESULTS  # noqa: E402

ROWS = (0, 9, 17)  # the base model, P-Tuning v2, LoRA on QKV of the last 3 layers
STOPPED = 17  # the row whose training is interrupted and resumed
TARGETS = {"8 x A100": (312e12, 8), "1 x H100": (989e12, 1)}  # peak bf16 dense FLOP/s, GPUs (runs side by side)
SIZES = {  # preset, dtype written, launch.sh's environment
    "6b": ("chatglm-6b", torch.bfloat16, {
        "TRAIN_EXTRA": "--val-size 0 --save-steps 10 --max-steps 30", "EVAL_EXTRA": "--max-samples 32"}),
    "small": ("tiny", torch.float32, {
        "TRAIN_EXTRA": "--precision fp32 --max-samples 16 --val-size 0 --batch-size 4 --max-source-length 48 "
                       "--max-target-length 16 --save-steps 2 --max-steps 40",
        "EVAL_EXTRA": "--precision fp32 --max-samples 4 --max-length 48 --max-source-length 40",
        "DATA_DIR": "data/demo", "OMP_NUM_THREADS": "1"}),
}


def write_model(preset: str, dtype: torch.dtype, out: Path, device):
    """Random weights of `preset` in the released layout, with the demo tokenizer and its special-token ids."""
    tiny = ChatGLMConfig.from_name("tiny")
    config = replace(ChatGLMConfig.from_name(preset), **{k: getattr(tiny, k) for k in (
        "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")})
    with torch.device("meta"):
        model = ChatGLMModel(config)
    model = model.to(dtype).to_empty(device=device).init_weights(0)
    save_model(model.state_dict(), config, out, tokenizer_file=DEMO_TOKENIZER)


def study_settings(plan: Plan, row) -> train.Settings:
    """train.py's settings of a row's command (the flags after train.py)."""
    words = shlex.split(plan.run(row, 42).train)
    return train.parse_args(words[words.index("train.py") + 1:])


def load_and_save(s: train.Settings, out: Path, device) -> dict:
    """train.py's model load, one optimizer step on a random batch, its checkpoint save: seconds of each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # not the written model's
    t0 = time.perf_counter()
    model, base = train.build_model(s.model, s.adapter, s.run, s.optim.seed, None, device)
    sync()
    load_s = time.perf_counter() - t0
    trainer = train.make_trainer(model, s.optim, s.run, 1, 0, 1, device, base)
    batch = random_batch(model.config, s.optim.batch_size, 256, torch.Generator().manual_seed(0))
    train.forward_backward(trainer, [(batch, 1 / n_targets(batch["labels"]))])
    train.optimizer_step(trainer, s.optim.max_grad_norm)
    sync()
    t0 = time.perf_counter()
    training.save_checkpoint(out, trainer, s.adapter, training.Progress(step=1), 1)
    save_s = time.perf_counter() - t0
    files = list((out / CHECKPOINTS / "step-1").iterdir())
    return {"load_s": load_s, "checkpoint_save_s": save_s, "checkpoint_bytes": sum(f.stat().st_size for f in files),
            "peak_memory_bytes": peak_memory_bytes(device)}


def flops_per_token(s: train.Settings, tokens_per_sample: int) -> float:
    """bench/train.py's FLOP count of one training step, per token, for a sample of the measured mean length."""
    config = ChatGLMConfig.from_json(Path(s.model) / "config.json")
    with torch.device("meta"):
        model = ChatGLMModel(config)
    apply_adapter(model, s.adapter)
    lowest = train.lowest_trainable_layer(model)
    return step_flops(model, config, 1, tokens_per_sample, lowest) / tokens_per_sample


def launch(env: dict, *ids: int) -> subprocess.Popen:
    return subprocess.Popen(["bash", "launch.sh", *map(str, ids)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, what: str):
    out, _ = p.communicate()
    print(out[-3000:], flush=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what}: launch.sh exited {p.returncode}")


def stop_after_checkpoint(p: subprocess.Popen, run: Path, timeout: float) -> int:
    """Ctrl-C to the launcher once `run` has a checkpoint -> the step it holds (the run must not have finished)."""
    deadline = time.time() + timeout
    while checkpoint.latest(run / CHECKPOINTS) is None and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    print(out[-3000:], flush=True)
    latest = checkpoint.latest(run / CHECKPOINTS)
    if p.returncode != 130 or latest is None or (run / TRAIN_RESULTS).is_file():
        raise RuntimeError(f"{run}: not stopped between its first checkpoint and its end (launch.sh exited "
                           f"{p.returncode}); see its train.log")
    return int(latest.name.split("-")[1])


def measured(runs: Path, plan: Plan, settings: dict, peak: float | None) -> tuple[dict, dict]:
    """Each trained row's figures from train_results.json, each evaluation's from metrics.json."""
    trained, evaluated = {}, {}
    for row in GRID:
        if row.id not in ROWS:
            continue
        run = plan.run(row, 42)
        if row.method != "none":
            r = read_json(runs / run.name / TRAIN_RESULTS)
            per_sample = round(r["tokens_per_s"] / r["samples_per_s"])
            fpt = flops_per_token(settings[row.id], per_sample)
            trained[run.name] = {"tokens_per_s": r["tokens_per_s"], "tokens_per_sample": per_sample,
                                 "flops_per_token": fpt, "mfu": fpt * r["tokens_per_s"] / peak if peak else None,
                                 "peak_memory_bytes": r["peak_memory_bytes"]}
        for name in EVAL_SETS:
            m = read_json(runs / run.name / EVAL / name / "metrics.json")
            evaluated[f"{run.name} {name}"] = {
                "n_samples": m["n_samples"], "runtime_s": m["runtime_s"],
                "s_per_sample": m["runtime_s"] / m["n_samples"],
                "generation_tokens_per_s": m["generation_tokens_per_s"], "nll_s": m["reference_nll"]["runtime_s"]}
    return trained, evaluated


def read_json(path: Path):
    """A file the check's own runs wrote, or a dataset the training just read: no damage to explain."""
    return json.loads(path.read_text(encoding="utf-8"))


def count_records(data_dir: str, name: str) -> int:
    info = read_json(Path(data_dir) / "dataset_info.json")
    return len(read_json(Path(data_dir) / info[name]["file_name"]))


def estimate(study: Plan, trained: dict, evaluated: dict, load_s: float, peak: float) -> dict:
    """The grid's work (FLOPs of every training, evaluated samples, model loads) over each target's rate."""
    mfu = sum(t["mfu"] for t in trained.values()) / len(trained)
    per_sample = round(sum(t["tokens_per_sample"] for t in trained.values()) / len(trained))
    eval_s = sum(e["s_per_sample"] for e in evaluated.values()) / len(evaluated)
    rows = []
    for row in GRID:
        if row.method == "none":
            continue
        s = study_settings(study, row)
        counts = [count_records(s.data.dataset_dir, d) for d in s.data.names]  # --max-samples: per dataset
        samples = sum(min(n, s.data.max_samples) if s.data.max_samples else n for n in counts) - s.val.val_size
        tokens = samples * s.optim.epochs * per_sample
        rows.append({"id": row.id, "samples": samples, "epochs": s.optim.epochs, "tokens": tokens,
                     "flops": tokens * flops_per_token(s, per_sample)})
    flops = sum(r["flops"] for r in rows)
    n_eval = len(GRID) * len(EVAL_SETS) * EVAL_SAMPLES
    n_loads = len(rows) + len(GRID)  # every training and every evaluation loads the model once
    targets = {}
    for name, (target_peak, gpus) in TARGETS.items():
        train_s = flops / (target_peak * mfu)
        evals_s = n_eval * eval_s * peak / target_peak
        total = train_s + evals_s + n_loads * load_s
        targets[name] = {"peak_flops": target_peak, "gpus": gpus, "train_s": train_s, "eval_s": evals_s,
                         "load_s": n_loads * load_s, "gpu_s": total, "wall_s": total / gpus}
    return {"mfu": mfu, "tokens_per_sample": per_sample, "eval_s_per_sample": eval_s, "measured_peak_flops": peak,
            "load_s": load_s, "rows": rows, "flops": flops, "eval_samples": n_eval, "loads": n_loads,
            "targets": targets}


def arithmetic(e: dict) -> list[str]:
    lines = [f"training: {len(e['rows'])} runs, {sum(r['tokens'] for r in e['rows']):.4g} tokens "
             f"({e['tokens_per_sample']} per sample), {e['flops']:.4g} FLOPs; evaluation: {e['eval_samples']} samples "
             f"at {e['eval_s_per_sample']:.4g} s each here; {e['loads']} model loads at {e['load_s']:.3g} s"]
    for name, t in e["targets"].items():
        lines.append(f"{name}: training {e['flops']:.4g} / ({t['peak_flops']:.4g} x MFU {e['mfu']:.4f}) = "
                     f"{t['train_s']:.0f} s; evaluation {e['eval_samples']} x {e['eval_s_per_sample']:.4g} s x "
                     f"{e['measured_peak_flops']:.4g} / {t['peak_flops']:.4g} = {t['eval_s']:.0f} s; loads "
                     f"{t['load_s']:.0f} s; ({t['train_s']:.0f} + {t['eval_s']:.0f} + {t['load_s']:.0f}) / "
                     f"{t['gpus']} GPUs = {t['wall_s']:.0f} s = {t['wall_s'] / 3600:.2f} h")
    return lines


def markdown(r: dict) -> str:
    lines = [f"Device: {r['device']}, PyTorch {r['torch']}, {r['date']}; model {r['model']['preset']} (random, "
             f"written in {r['model']['write_s']:.1f} s); the check took {r['wall_s']:.0f} s.", "",
             "| stage | figure |", "| --- | --- |",
             f"| load (train.py build_model) | {r['load_s']:.2f} s |",
             f"| checkpoint save (row {STOPPED}'s adapter and optimizer) | {r['checkpoint_save_s']:.2f} s, "
             f"{r['checkpoint_bytes'] / 2**20:.1f} MiB |"]
    for name, t in r["train"].items():
        mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] is not None else ""
        lines.append(f"| training {name} | {t['tokens_per_s']:,.0f} tokens/s{mfu}, "
                     f"{t['tokens_per_sample']} tokens per sample, peak {t['peak_memory_bytes'] / 2**30:.2f} GiB |")
    for name, e in r["eval"].items():
        lines.append(f"| evaluation {name} | {e['n_samples']} samples in {e['runtime_s']:.1f} s, "
                     f"{e['generation_tokens_per_s']:,.0f} generated tokens/s, NLL pass {e['nll_s']:.2f} s |")
    res = r["resume"]
    lines += [f"| stopped and resumed: {res['run']} | stopped at step {res['stopped_at_step']}; adapter "
              f"{'equal, byte for byte, to' if res['equal'] else 'DIFFERENT from'} the uninterrupted run's |", ""]
    if r["estimate"]:
        lines += ["Estimate of the whole grid (the measured MFU assumed to carry over):", ""]
        lines += [f"- {line}" for line in arithmetic(r["estimate"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="study_check", help="directory for study_check.json and study_check.md")
    p.add_argument("--small", action="store_true", help="the tiny preset on the demo data (a CPU: the test)")
    p.add_argument("--peak-tflops", type=POSITIVE, default=None,
                   help="this device's peak bf16 dense TFLOP/s (default: by GPU name, bench/train.py); without "
                        "one there is no MFU and no estimate")
    p.add_argument("--work", default=None, help="directory for the model and the runs (default: a temporary one)")
    args = p.parse_args(argv)
    out, work_parent = Path(args.out).resolve(), args.work and Path(args.work).resolve()
    os.chdir(ROOT)  # where launch.sh runs: its relative paths (data/demo, ../shared/data) mean the same here
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak = tflops * 1e12 if tflops else None
    preset, dtype, extra = SIZES["small" if args.small else "6b"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_parent) as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        write_model(preset, dtype, model_dir, device)
        write_s = time.perf_counter() - t0
        env = {**os.environ, "PY": sys.executable, "MODEL": str(model_dir), "NPROC": "1", "PARALLEL": "1",
               "SEEDS": "1", **extra}
        runs, again = work / "runs", work / "runs-uninterrupted"
        plan = Plan.from_env({**env, "RUNS": str(runs)})
        settings = {row.id: study_settings(plan, row) for row in GRID if row.id in ROWS and row.method != "none"}
        saved = load_and_save(settings[STOPPED], work / "checkpoint", device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

        stopped = plan.run(GRID[STOPPED], 42)
        step = stop_after_checkpoint(launch({**env, "RUNS": str(runs)}, *ROWS), stopped.dir, timeout=400)
        finish(launch({**env, "RUNS": str(runs)}, *ROWS), "the resumed launch")
        reference = Plan.from_env({**env, "RUNS": str(again)}).run(GRID[STOPPED], 42)
        done = subprocess.run(shlex.split(reference.train), env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the uninterrupted training failed: {(done.stderr or done.stdout)[-2000:]}")
        adapter = "adapter_model.safetensors"
        equal = (stopped.dir / adapter).read_bytes() == (reference.dir / adapter).read_bytes()

        trained, evaluated = measured(runs, plan, settings, peak)
        study = Plan.from_env({k: v for k, v in env.items() if k not in ("TRAIN_EXTRA", "EVAL_EXTRA")})
        result = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                  "model": {"preset": preset, "vocab_size": ChatGLMConfig.from_name(preset).vocab_size,
                            "dtype": str(dtype), "tokenizer": "data/demo/ice_text.model", "write_s": write_s},
                  "launch_env": extra, "data_dir": plan.data_dir, **saved,
                  "train": trained, "eval": evaluated,
                  "resume": {"run": stopped.name, "stopped_at_step": step, "equal": equal},
                  "estimate": estimate(study, trained, evaluated, saved["load_s"], peak) if peak else None}
    result["wall_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study_check.json", result)
    (out / "study_check.md").write_text(markdown(result))
    print(markdown(result))
    if not equal:
        sys.exit(f"{stopped.name}: the resumed adapter differs from the uninterrupted one")


if __name__ == "__main__":
    main()
