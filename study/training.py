"""train.py's run directory (--output-dir): recognised as the same run or another, started, plotted; the loop's
Progress, and the checkpoints it resumes from bit for bit.

A run is recognised by its run_config.json: the same arguments (less the VOLATILE ones, which change no number)
and world size are the same run, which --resume continues; anything else is another run, which --overwrite
replaces. The file names are study/rundir.py's.
"""
import functools
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from adapters.files import ADAPTER_FILES, write_adapter
from runtime import checkpoint
from runtime.files import InputError, append_jsonl, load_json, read_jsonl, write_json, write_jsonl
from runtime.process import say_once

from .fingerprint import git_commit, library_versions
from .rundir import CHECKPOINTS, LOG, LOSS_PLOT, RUN_CONFIG, TENSORBOARD_EVENTS, TRAIN_RESULTS

VOLATILE_ARGS = {"resume", "overwrite", "dry_run", "attention", "dist_timeout", "logging_steps", "plot_loss",
                 "tensorboard", "save_steps", "save_minutes", "output_dir", "eval_steps"}
OUR_FILES = (RUN_CONFIG, LOG, TRAIN_RESULTS, LOSS_PLOT, *ADAPTER_FILES, CHECKPOINTS)


def run_config(args: dict, world: int) -> dict:
    """run_config.json: every argument, the world size, the command line, library versions, git commit."""
    commit, dirty = git_commit()
    return {"args": args, "world_size": world, "seed": args["seed"], "command": sys.argv,
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
    previous = out / RUN_CONFIG
    if overwrite:
        return None
    if not previous.is_file():
        stray = [name for name in OUR_FILES if (out / name).exists()]
        if stray:
            raise ValueError(f"{out} holds {', '.join(stray)} but no run_config.json (not a train.py run); "
                             "choose another --output-dir or pass --overwrite")
        return None
    old = load_json(previous, "train.py writes this file: pass --overwrite to start over")
    if not (isinstance(old, dict) and isinstance(old.get("args"), dict) and isinstance(old.get("world_size"), int)):
        raise InputError(f"{previous}: not what train.py writes (args, world_size); pass --overwrite to start over")
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
    latest, damaged = checkpoint.resumable(out / CHECKPOINTS)
    if damaged and latest is None:
        raise ValueError(f"{out / CHECKPOINTS}: no checkpoint can be read ({'; '.join(damaged)}); pass --overwrite "
                         "to start over")
    if damaged:
        say_once(f"{out / CHECKPOINTS}: cannot read {'; '.join(damaged)}; resuming from {latest.name}")
    return latest


def start_run(out: Path, config: dict, resumed_step: int | None):
    """Rank 0, before the first step: a fresh run clears our files, a resumed one drops the log lines the
    interrupted run wrote after its checkpoint; then the run's config."""
    out.mkdir(parents=True, exist_ok=True)
    if resumed_step is None:
        clear_outputs(out)
    truncate_log(out / LOG, resumed_step or 0)
    write_json(out / RUN_CONFIG, config)


def clear_outputs(out: Path):
    for name in OUR_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in out.glob(TENSORBOARD_EVENTS):  # an earlier run's curves would show beside this one's
        path.unlink()


def truncate_log(log_file: Path, last_step: int):
    """On resume: drop the lines the interrupted run wrote after its checkpoint (and one a kill cut short)."""
    if log_file.is_file():
        write_jsonl(log_file, [r for r in read_jsonl(log_file) if r["step"] <= last_step])


def log(out: Path, board, record: dict):
    """A trainer_log.jsonl line; with --tensorboard (`board`: a SummaryWriter), each of its numbers but the step
    and the epoch as a TensorBoard scalar of the same name at that step, flushed at once (an interrupted run keeps
    what it logged)."""
    append_jsonl(out / LOG, [record])
    if board is not None:
        for key, value in record.items():
            if key not in ("step", "epoch"):
                board.add_scalar(key, value, record["step"])
        board.flush()


def open_board(out: Path, step: int):
    """--tensorboard: a writer of TensorBoard event files into the run directory, so that `tensorboard --logdir
    runs` shows every run of the grid together, each named by its directory. Resumed after step `step`, the events
    its interrupted attempt wrote after that step are hidden, as truncate_log drops those lines of the log."""
    from torch.utils.tensorboard import SummaryWriter  # train.py checked that the tensorboard package is there

    return SummaryWriter(str(out), purge_step=step + 1 if step else None)


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


def resume_hint(out: Path) -> str:
    """What a user can do after an interruption."""
    latest = checkpoint.latest(out / CHECKPOINTS)
    if latest is None:
        return f"no checkpoint in {out} yet (--save-steps / --save-minutes): the same command with --resume starts over"
    return f"{latest} is kept: the same command with --resume continues from it"


# ---------------------------------------------------------------- the loop's progress and checkpoints

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

    def counters(self, steps_per_epoch: int) -> dict:
        """What a checkpoint keeps of the loop (the data position follows from the step)."""
        return {"step": self.step, "epoch": self.step // steps_per_epoch, "step_in_epoch": self.step % steps_per_epoch,
                "loss_total": self.loss_total, "window": self.window, "val": self.val}


def save_adapter_files(trainer, spec):
    """-> a function that writes the trained tensors as adapter files into a directory (rank 0). Under FSDP2 a
    collective: every rank gathers the full tensors."""
    tensors = checkpoint.trainable_state(trainer.model) if trainer.fsdp or trainer.rank == 0 else None
    return functools.partial(write_adapter, tensors, spec, trainer.model.config, trainer.base_weights)


def save_checkpoint(out: Path, trainer, spec, progress: Progress, steps_per_epoch: int):
    """checkpoints/step-N/ (runtime/checkpoint.py) of train.Trainer `trainer`: the adapter, the optimizer,
    schedule, RNG and the loop's counters. A collective: every rank calls it."""
    t = trainer
    checkpoint.save(out / CHECKPOINTS, progress.step, save_adapter_files(t, spec), t.model, t.optimizer, t.scheduler,
                    t.scaler, progress.counters(steps_per_epoch), t.fsdp, t.rank, t.world, t.device)
    if t.world > 1:
        dist.barrier()


def resume(checkpoint_dir: Path, trainer) -> Progress:
    """The optimizer, schedule, loss scaler and this rank's RNG as they were after the checkpoint's step (its
    adapter is in the model already: build_model); -> the loop's Progress at that step."""
    t = trainer
    c = checkpoint.load(checkpoint_dir, t.model, t.optimizer, t.scheduler, t.scaler, t.fsdp, t.rank, t.device)
    kinds = {"loss_total": float, "window": list, "val": dict}  # the step: checkpoint.state_ok
    wrong = [k for k, kind in kinds.items() if not isinstance(c.get(k), kind)]
    if wrong:
        raise InputError(f"{checkpoint_dir / checkpoint.STATE}: the loop's {', '.join(wrong)} missing or of the wrong "
                         "type; delete this step directory to resume from the one before, or pass --overwrite")
    return Progress(step=c["step"], loss_total=c["loss_total"], window=c["window"], val=c["val"])
