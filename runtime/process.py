"""The process a command runs in: the torchrun set-up, printing once, collectives on Python objects, the RNG
state a training step draws from, peak memory."""
import os
import random
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def say_once(text: str):
    """Print on rank 0 only (before the process group exists: by the RANK torchrun sets)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def init_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; a plain `python script.py` is rank 0 of 1. On several nodes RANK
    counts over all of them and LOCAL_RANK within this node: the GPU is LOCAL_RANK's, printing and rank 0's files
    go by RANK (rank 0 writes the run; --resume reads its checkpoint on every node: a filesystem they all see).

    NCCL on CUDA, gloo on CPU; a collective that waits longer than the timeout ends the job."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    return rank, world, device


def all_gather(obj, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank (a collective when world > 1)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather(obj, rank: int, world: int) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks (a collective when world > 1)."""
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def rng_state(device: torch.device) -> dict:
    """Every generator a training step draws from (dropout, Python and NumPy shuffles): saved per rank. Tensors,
    numbers and tuples only, so that a checkpoint loads with torch.load(weights_only=True): no code runs from it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory allocated; CPU: the resident-set high-water mark of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
