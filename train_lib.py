"""The parts of train.py that are bookkeeping, not training: the run directory, checkpoints with
exact-resume state, the learning-rate schedule, FSDP2 sharding, the untrained-tensor check, plots.

Run directory (train.py --output-dir RUN):
    run_config.json          every argument, world size, seed, library versions, git commit
    trainer_log.jsonl        one line per --logging-steps: step, epoch, loss, lr, grad_norm, tokens_per_s
    train_results.json       at the end
    adapter.json, adapter_model.safetensors     the final adapter (adapters.save_adapter)
    checkpoints/step-N/      adapter + optimizer.pt + trainer_state.pt (written last: its presence marks
                             a complete checkpoint); the last two are kept
"""
import json
import math
import platform
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from files import replace_dir

# Arguments that do not change what a run computes: a run restarted with other values is the same run.
VOLATILE_ARGS = {"resume", "overwrite", "dry_run", "dist_timeout", "logging_steps", "plot_loss", "save_steps",
                 "output_dir"}
OUR_FILES = ("run_config.json", "trainer_log.jsonl", "train_results.json", "training_loss.png", "adapter.json",
             "adapter_model.safetensors", "adapter_config.json", "checkpoints")
KEEP_CHECKPOINTS = 2


# ---------------------------------------------------------------- run directory

def run_config(args, world: int) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("sentencepiece", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    repo = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"args": vars(args), "world_size": world, "seed": args.seed, "command": sys.argv,
            "versions": versions, "git_commit": commit, "git_dirty": dirty}


def same_run(a: dict, b: dict) -> bool:
    def key(c):
        return {k: v for k, v in c["args"].items() if k not in VOLATILE_ARGS}, c["world_size"]
    return key(a) == key(b)


def check_output_dir(out: Path, config: dict, resume: bool, overwrite: bool) -> Path | None:
    """Decide, before anything is trained, what to do with an existing run directory.

    Returns the checkpoint to resume from (None: start from scratch). Files other runs' tools put
    there (launch.sh's run.json, eval/) are left alone; only a run_config.json marks a training run.
    """
    previous = out / "run_config.json"
    if overwrite:
        return None
    if not previous.is_file():
        stray = [name for name in OUR_FILES if (out / name).exists()]
        if stray:
            raise ValueError(f"{out} holds {', '.join(stray)} but no run_config.json (not a train.py run); "
                             "choose another --output-dir or pass --overwrite")
        return None
    with open(previous, encoding="utf-8") as f:
        old = json.load(f)
    if not same_run(old, config):
        diff = sorted(k for k in set(old["args"]) | set(config["args"]) if k not in VOLATILE_ARGS
                      and old["args"].get(k) != config["args"].get(k))
        if old["world_size"] != config["world_size"]:
            diff.append(f"world_size ({old['world_size']} -> {config['world_size']})")
        raise ValueError(f"{out} holds a different training run (differs in: {', '.join(diff)}); "
                         "choose another --output-dir or pass --overwrite to replace it")
    if not resume:
        raise ValueError(f"{out} already holds this run; pass --resume to continue it from its latest "
                         "checkpoint or --overwrite to start over")
    return latest_checkpoint(out)


def clear_outputs(out: Path):
    for name in OUR_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((int(m.group(1)), p) for p in (out / "checkpoints").glob("step-*")
                   if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.pt").is_file())
    return steps[-1][1] if steps else None


def truncate_log(log_file: Path, last_step: int):
    """On resume: drop log lines the interrupted run wrote after its last checkpoint."""
    if not log_file.is_file():
        return
    lines = [ln for ln in log_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    log_file.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= last_step), encoding="utf-8")


# ---------------------------------------------------------------- checkpoints

def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def full_trainable_state(model) -> dict:
    """name -> full CPU tensor of every trainable parameter. Under FSDP2 a collective: every rank calls it."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = t.detach().to("cpu", copy=True)
    return state


def optimizer_state(model, optimizer, fsdp: bool) -> dict:
    """The optimizer state as one plain dict on rank 0 (FSDP2: gathered from the shards)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, file: Path, fsdp: bool, master: bool):
    """FSDP2: rank 0 reads the one plain file and the shards are scattered from it."""
    if not fsdp:
        optimizer.load_state_dict(torch.load(file, weights_only=True))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(file, weights_only=True) if master else {}
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def write_checkpoint(out: Path, step: int, save_adapter_fn, optim_state: dict, trainer_state: dict):
    """Rank 0: checkpoints/step-N/ via a temp dir and one rename; a kill meanwhile leaves older ones intact."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter_fn(tmp)
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")  # last: marks the checkpoint complete
    replace_dir(tmp, final)
    done = sorted((int(m.group(1)), p) for p in final.parent.glob("step-*")
                  if (m := re.fullmatch(r"step-(\d+)", p.name)))
    for _, p in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- schedule, sharding, checks

def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine/linear decay to 0."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return f


def shard_fsdp2(model, mp_policy):
    """FSDP2 units: each block, and the root (embeddings, final norm, lm_head).

    FSDP2 all-gathers a unit as one flat buffer of one dtype, but a block with an adapter mixes float32
    trainable tensors (the master weights) with the bf16 frozen base. There, every module that directly
    owns trainable tensors (LoRA's A and B, a Freeze-trained Linear) becomes its own unit first, so the
    block's unit keeps only the frozen bf16 rest. The prefix encoder is a unit of its own as well.
    """
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.layers:
        if len({p.dtype for p in block.parameters()}) > 1:
            for name, module in block.named_modules():
                own = list(module.parameters(recurse=False))
                if module is block or not any(p.requires_grad for p in own):
                    continue
                if len({p.dtype for p in own}) > 1:
                    raise ValueError(f"FSDP2 cannot shard {name}: its own parameters mix dtypes "
                                     f"{sorted(str(p.dtype) for p in own)}; use --dist ddp or --precision fp32")
                fully_shard(module, mp_policy=mp_policy)
        fully_shard(block, mp_policy=mp_policy)
    if model.transformer.prefix_encoder is not None:
        fully_shard(model.transformer.prefix_encoder, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)


def grad_sums(params: list, fsdp: bool, device) -> torch.Tensor:
    """Sum of |grad| per parameter (-1 where it has none), the same on every rank."""
    sums = torch.stack([torch.tensor(-1.0, device=device) if p.grad is None else
                        (p.grad.to_local() if fsdp else p.grad).detach().float().abs().sum() for p in params])
    if fsdp:  # each rank holds a shard of every gradient; a missing one is missing on every rank
        missing = sums < 0
        dist.all_reduce(sums)
        sums = torch.where(missing, -1.0, sums)
    return sums.cpu()


class UntrainedError(RuntimeError):
    pass


def untrained_tensors(names: list[str], sums_by_step: list[torch.Tensor], zero_ok: bool = False) -> list[str]:
    """Trainable tensors whose gradient was missing (or all zero) at every checked step.

    Why two steps: LoRA's B starts at zero, so at step 1 the gradient of A (which flows through B)
    is exactly zero by construction; after one optimizer step B is nonzero and so is A's gradient.
    A tensor still without gradient at step 2 is the classic silently untrained adapter: a hook, a
    detach, a module the forward never calls. With a single step only missing gradients count.
    """
    sums = torch.stack(sums_by_step)  # (steps, tensors)
    trained = (sums >= 0 if zero_ok else sums > 0).any(dim=0)
    return [n for n, ok in zip(names, trained.tolist()) if not ok]


# ---------------------------------------------------------------- reporting

def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # resident-set high-water mark of this process
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def plot_loss(log_file: Path, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(ln) for ln in log_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(png.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
