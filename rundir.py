"""The run directory of train.py --output-dir RUN: how a run is recognised, what it writes, and the
checkpoints it resumes from bit for bit.

    run_config.json          every argument, world size, seed, library versions, git commit
    trainer_log.jsonl        one line per --logging-steps: step, epoch, loss, lr, grad_norm, tokens_per_s;
                             with validation, one per --eval-steps: step, epoch, val_loss
    train_results.json       at the end
    training_loss.png        with --plot-loss
    adapter.json, adapter_model.safetensors     the final adapter (adapters.save_adapter)
    checkpoints/step-N/      adapter + optimizer.pt + trainer_state.pt (written last: its presence marks
                             a complete checkpoint); the last two are kept

A checkpoint holds everything a step depends on: the trainable tensors, the optimizer, the schedule, the
loss scaler, every rank's RNG state and the loop's Progress. The data position follows from the step.
"""
import functools
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from adapters import apply_adapter, copy_weights, read_adapter, save_adapter
from files import read_jsonl, replace_dir, write_json, write_text, writing
from fingerprint import git_commit, library_versions
from model import ChatGLMModel
from runtime import all_gather, rng_state, set_rng_state

LOG = "trainer_log.jsonl"
# Arguments that do not change what a run computes: a run restarted with other values is the same run.
VOLATILE_ARGS = {"resume", "overwrite", "dry_run", "attention", "dist_timeout", "logging_steps", "plot_loss",
                 "save_steps", "save_minutes", "output_dir", "eval_steps"}
OUR_FILES = ("run_config.json", LOG, "train_results.json", "training_loss.png", "adapter.json",
             "adapter_model.safetensors", "adapter_config.json", "checkpoints")
KEEP_CHECKPOINTS = 2


# ---------------------------------------------------------------- the run: recognised, started, plotted

def run_config(args, world: int) -> dict:
    commit, dirty = git_commit()
    return {"args": vars(args), "world_size": world, "seed": args.seed, "command": sys.argv,
            "versions": library_versions(), "git_commit": commit, "git_dirty": dirty}


def same_run_key(args: dict, world: int) -> tuple[dict, int]:
    """What makes two trainings the same run: every argument but the VOLATILE ones, and the world size."""
    return {k: v for k, v in args.items() if k not in VOLATILE_ARGS}, world


def same_run(a: dict, b: dict) -> bool:
    return same_run_key(a["args"], a["world_size"]) == same_run_key(b["args"], b["world_size"])


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
    old = json.loads(previous.read_text(encoding="utf-8"))
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


def start_run(out: Path, config: dict, resumed_step: int | None):
    """Rank 0, before the first step: a fresh run clears our files, a resumed one drops the log lines the
    interrupted run wrote after its checkpoint; then the run's config."""
    out.mkdir(parents=True, exist_ok=True)
    if resumed_step is None:
        clear_outputs(out)
    truncate_log(out / LOG, resumed_step or 0)
    write_json(out / "run_config.json", config)


def clear_outputs(out: Path):
    for name in OUR_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def truncate_log(log_file: Path, last_step: int):
    """On resume: drop the lines the interrupted run wrote after its checkpoint (and one a kill cut short)."""
    if log_file.is_file():
        rows = [r for r in read_jsonl(log_file) if r["step"] <= last_step]
        write_text(log_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def plot_loss(log_file: Path, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(log_file)
    train, val = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(png.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- checkpoints

@dataclass
class Progress:
    """The loop's running totals. step, loss_total, window and val go into every checkpoint; the throughput
    counters belong to this process (a resumed run measures its own speed)."""
    step: int = 0
    loss_total: float = 0.0  # sum of the step losses: train_loss = loss_total / step
    window: list[float] = field(default_factory=list)  # step losses since the last log line
    val: dict = field(default_factory=dict)  # val_loss (the latest), best_val_step, best_val_loss; {}: none yet
    tokens: float = 0.0  # input tokens of every rank since t0
    samples: int = 0
    t0: float = 0.0  # time.time() when the loop starts
    val_s: float = 0.0  # seconds of validation since t0: not training time, left out of the throughput
    saved_at: float = 0.0  # time.time() of the last checkpoint (--save-minutes)

    def add(self, loss: float, tokens: float, samples: int):
        self.step += 1
        self.loss_total += loss
        self.window.append(loss)
        self.tokens += tokens
        self.samples += samples

    def add_val(self, loss: float):
        """The validation loss after this step; the lowest so far is the best (the earliest of equal ones)."""
        if loss < self.val.get("best_val_loss", math.inf):
            self.val.update(best_val_step=self.step, best_val_loss=loss)
        self.val["val_loss"] = loss

    def val_text(self) -> str:
        v = self.val
        return f"val_loss {v['val_loss']:.4f} (best {v['best_val_loss']:.4f} at step {v['best_val_step']})"

    def train_s(self) -> float:
        return time.time() - self.t0 - self.val_s

    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s()


def resume_hint(out: Path) -> str:
    """What a user can do after an interruption."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return f"no checkpoint in {out} yet (--save-steps / --save-minutes): the same command with --resume starts over"
    return f"{checkpoint} is kept: the same command with --resume continues from it"


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((int(m.group(1)), p) for p in (out / "checkpoints").glob("step-*")
                   if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.pt").is_file())
    return steps[-1][1] if steps else None


def full_trainable_state(model) -> dict:
    """name -> full CPU tensor of every trainable parameter. Under FSDP2 a collective: every rank calls it."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = t.detach().to("cpu", copy=True)
    return state


def save_trainable(model, spec, fsdp: bool, master: bool, dest: Path | None):
    """The adapter into `dest` (rank 0). Under FSDP2 a collective: the full trainable tensors are
    gathered and rank 0 saves them through a meta-device copy of the model that holds them."""
    if not fsdp:
        if master:
            save_adapter(model, spec, dest)
        return
    full = full_trainable_state(model)
    if master:
        with torch.device("meta"):
            shadow = ChatGLMModel(model.config)
        apply_adapter(shadow, spec)
        shadow.load_state_dict(full, strict=False, assign=True)
        shadow.base_weights = model.base_weights
        save_adapter(shadow, spec, dest)


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
    with writing(tmp):
        save_adapter_fn(tmp)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer_state.pt")  # last: marks the checkpoint complete
    replace_dir(tmp, final)
    done = sorted((int(m.group(1)), p) for p in final.parent.glob("step-*")
                  if (m := re.fullmatch(r"step-(\d+)", p.name)))
    for _, p in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out: Path, s, spec, progress: Progress, steps_per_epoch: int):
    """checkpoints/step-N/ for `s` (a train.Setup). A collective: every rank calls it."""
    optim_state = optimizer_state(s.model, s.optimizer, s.fsdp)
    rngs = all_gather(rng_state(s.device), s.world)
    if s.rank == 0:
        step = progress.step
        state = {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                 "loss_total": progress.loss_total, "window": progress.window, "val": progress.val,
                 "scheduler": s.scheduler.state_dict(),
                 "scaler": s.scaler.state_dict(), "rng": rngs, "world_size": s.world}
        write_checkpoint(out, step, functools.partial(save_trainable, s.model, spec, s.fsdp, True), optim_state, state)
    else:
        save_trainable(s.model, spec, s.fsdp, False, None)
    if s.world > 1:
        dist.barrier()


def load_trainable(model, checkpoint: Path):
    """Before sharding: the checkpoint's adapter into the float32 trainable tensors (adapters.load_adapter
    would keep the base dtype)."""
    copy_weights(model, read_adapter(checkpoint, model.config)[1])


def resume(checkpoint: Path, s) -> Progress:
    """The optimizer, schedule, loss scaler and this rank's RNG of `s` (a train.Setup) as they were after
    the checkpoint's step; -> the loop's Progress at that step."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)  # our own file: RNG tuples
    load_optimizer_state(s.model, s.optimizer, checkpoint / "optimizer.pt", s.fsdp, s.rank == 0)
    s.scheduler.load_state_dict(state["scheduler"])
    s.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][s.rank], s.device)
    return Progress(step=state["step"], loss_total=state["loss_total"], window=state["window"], val=state["val"])
