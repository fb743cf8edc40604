"""Training-state checkpoints: everything an optimizer step depends on, so that a resumed run repeats the
uninterrupted one bit for bit.

    DIR/step-N/                 one checkpoint, built as step-N.tmp and renamed; the last KEEP are kept
        (the trained weights)   written by the caller's function (train.py: the adapter's files)
        optimizer.pt            the optimizer state as one plain dict (FSDP2: gathered on rank 0)
        trainer_state.pt        written last, so that its presence marks a complete checkpoint:
                                the loop's counters (train.py's Progress), "scheduler", "scaler",
                                "rng" (every rank's generators, in rank order), "world_size"

The data position follows from the step. A checkpoint a damaged disk or a hand left unreadable, or whose files
hold something else than the above, is passed over for the previous one (`resumable`). What `load` reads must be
of the kinds this run's own optimizer, schedule and scaler have (`differs`): otherwise an InputError naming the
checkpoint, before any step.
"""
import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .files import InputError, replace_dir, writing
from .process import all_gather, rng_state, set_rng_state

OPTIMIZER, STATE = "optimizer.pt", "trainer_state.pt"
KEEP = 2


def steps(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-N directory, oldest first (complete or not)."""
    found = ((re.fullmatch(r"step-(\d+)", p.name), p) for p in Path(directory).glob("step-*"))
    return sorted((int(m.group(1)), p) for m, p in found if m)


def latest(directory: Path) -> Path | None:
    """The latest complete checkpoint in `directory`, or None."""
    done = [p for _, p in steps(directory) if (p / STATE).is_file()]
    return done[-1] if done else None


def resumable(directory: Path) -> tuple[Path | None, list[str]]:
    """The latest complete checkpoint whose every file reads, and what is wrong with each later one ("step-8
    (optimizer.pt: ...)"); (None, ...) where none reads."""
    damaged = []
    for _, path in reversed(steps(directory)):
        if not (path / STATE).is_file():
            continue
        problem = unreadable(path)
        if problem is None:
            return path, damaged
        damaged.append(f"{path.name} ({problem})")
    return None, damaged


def unreadable(checkpoint: Path) -> str | None:
    """What keeps a checkpoint's files from loading (the first one, in a few words), or None: torch files are
    opened (a truncated one has no zip directory) and checked for what `load` takes, safetensors by their header,
    JSON parsed."""
    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".pt":
                # no code runs from a file; the small trainer_state.pt is read whole (memory-mapped data is only
                # checked when used), the others memory-mapped
                content = torch.load(file, mmap=file.name != STATE, weights_only=True)
                if file.name == STATE and not state_ok(content, int(checkpoint.name.split("-")[1])):
                    return f"{file.name}: not a training state (its step, scheduler, scaler, one RNG state per rank)"
                if file.name == OPTIMIZER and not optimizer_ok(content):
                    return f"{file.name}: not an optimizer state (state, param_groups)"
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except Exception as e:  # whatever the reader says: the file cannot be resumed from
            return f"{file.name}: {str(e).split('. ')[0].splitlines()[0] if str(e) else type(e).__name__}"
    return None


def state_ok(state, step: int) -> bool:
    """trainer_state.pt holds what `load` takes: the step of its directory's name, the schedule's and the scaler's
    state, one RNG state per rank."""
    return isinstance(state, dict) and state.get("step") == step and type(step) is type(state["step"]) and all(
        isinstance(state.get(k), dict) for k in ("scheduler", "scaler")) and isinstance(state.get("rng"), list) and \
        len(state["rng"]) == state.get("world_size") and all(isinstance(r, dict) for r in state["rng"])


def trainable_state(model) -> dict:
    """name -> full CPU tensor of every trainable parameter. Under FSDP2 a collective: every rank calls it."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = t.detach().to("cpu", copy=True)
    return state


def optimizer_state(model, optimizer, fsdp: bool) -> dict:
    """The optimizer state as one plain dict on rank 0 (FSDP2: gathered from the shards; a collective)."""
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


def optimizer_ok(state) -> bool:
    """optimizer.pt is an optimizer's state_dict: a dict of per-parameter dicts, a list of parameter groups."""
    return isinstance(state, dict) and isinstance(state.get("state"), dict) and all(
        isinstance(v, dict) for v in state["state"].values()) and isinstance(state.get("param_groups"), list)


def differs(value, like, where: str) -> str | None:
    """Where `value` (read from a checkpoint) is not of the kind of `like` (this run's own, before loading): another
    type, a float that is not finite, a list of another length, a dict that lacks one of its keys; None: alike.
    A tuple and a list are alike (FSDP2's broadcast of the optimizer state turns Adam's betas into a list)."""
    def kind(x):
        return list if isinstance(x, tuple) else type(x)
    if kind(value) is not kind(like) or isinstance(like, float) and not math.isfinite(value):
        return f"{where} is {value!r:.40}"
    if isinstance(like, (list, tuple)):
        if len(value) != len(like):
            return f"{where} has {len(value)} items, not {len(like)}"
        return next((d for i, (v, w) in enumerate(zip(value, like)) if (d := differs(v, w, f"{where}[{i}]"))), None)
    if isinstance(like, dict):
        return next((f"{where} lacks {k!r}" if k not in value else differs(value[k], w, f"{where}.{k}")
                     for k, w in like.items() if k not in value or differs(value[k], w, "")), None)
    return None


def moments_problem(optimizer) -> str | None:
    """The optimizer's per-parameter state: finite tensors of the parameter's shape (or scalars, the step)."""
    for p, state in optimizer.state.items():
        for k, t in state.items():
            if not isinstance(t, torch.Tensor) or not torch.isfinite(t).all() or t.dim() and t.shape != p.shape:
                return f"{OPTIMIZER}: {k} is not a finite tensor of its parameter's shape {tuple(p.shape)}"
    return None


def save(directory: Path, step: int, write_weights, model, optimizer, scheduler, scaler, counters: dict,
         fsdp: bool, rank: int, world: int, device):
    """directory/step-N/. A collective: every rank calls it; rank 0 writes, `write_weights(dir)` included."""
    optim = optimizer_state(model, optimizer, fsdp)
    rngs = all_gather(rng_state(device), world)
    if rank == 0:
        write(directory, step, write_weights, optim, {**counters, "scheduler": scheduler.state_dict(),
                                                      "scaler": scaler.state_dict(), "rng": rngs, "world_size": world})


def write(directory: Path, step: int, write_weights, optim: dict, state: dict):
    """Rank 0: directory/step-N/ via a temp dir and one rename; a kill meanwhile leaves the older ones intact."""
    final = Path(directory) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        write_weights(tmp)
        torch.save(optim, tmp / OPTIMIZER)
        torch.save(state, tmp / STATE)  # last: marks the checkpoint complete
    replace_dir(tmp, final)
    for _, old in steps(directory)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def load(checkpoint: Path, model, optimizer, scheduler, scaler, fsdp: bool, rank: int, device) -> dict:
    """The optimizer, schedule, loss scaler and this rank's generators as they were after the checkpoint's step
    (the trained weights are the caller's); -> the loop's counters that `save` was given."""
    # this run's own settings, before the checkpoint's: what is loaded must be of the same kinds
    fresh = {"param_groups": [dict(g) for g in optimizer.param_groups], "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict()}
    try:  # the files opened (`unreadable`), but their data may be cut short, or edited by a hand or other code
        state = torch.load(checkpoint / STATE, weights_only=True)  # tensors and plain values only: no code runs
        load_optimizer_state(model, optimizer, checkpoint / OPTIMIZER, fsdp, rank == 0)
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler.load_state_dict(state.pop("scaler"))
        set_rng_state(state.pop("rng")[rank], device)
        loaded = {"param_groups": [dict(g) for g in optimizer.param_groups], "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict()}
        problem = differs(loaded, fresh, "the loaded") or (None if fsdp else moments_problem(optimizer))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as e:
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if problem:
        raise InputError(f"{checkpoint}: cannot resume from it ({problem}); delete this step directory to resume "
                         "from the one before, or pass --overwrite")
    state.pop("world_size")
    return state
