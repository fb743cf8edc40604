"""What train.py, evaluate.py and the benchmarks share about the process they run in: precision names,
the torchrun set-up, collectives on Python objects, the RNG state, peak memory."""
import os
import random
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEMO_MODEL = Path("runs") / "base-model"  # where `bash launch.sh` puts the demo's base model (from the repo root)
MODEL_HELP = ("checkpoint directory (released ChatGLM-6B layout) or a preset ('tiny': random weights). Unset: $MODEL, "
              f"else {DEMO_MODEL} (the demo's base model that `bash launch.sh` trains), else 'tiny'")


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """The model a script runs on: --model, else $MODEL (e.g. the downloaded ChatGLM-6B directory), else the demo's
    base model, else the `tiny` preset. -> (it, None when --model was given, else a line saying which was taken)."""
    if model is not None:
        return model, None
    if os.environ.get("MODEL"):
        return os.environ["MODEL"], f"model: $MODEL = {os.environ['MODEL']}"
    repo = Path(__file__).resolve().parent
    if (repo / DEMO_MODEL / "config.json").is_file():
        path = DEMO_MODEL if (Path.cwd() / DEMO_MODEL).resolve() == repo / DEMO_MODEL else repo / DEMO_MODEL
        return str(path), f"model: {path}, the demo's base model (no --model, no $MODEL)"
    return "tiny", (f"model: the 'tiny' preset with random weights (no --model, no $MODEL, no {DEMO_MODEL}: "
                    "`bash launch.sh` trains the demo's base model there)")


def say_once(text: str):
    """Print on rank 0 only (before the process group exists: by the RANK torchrun sets)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def init_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; a plain `python script.py` is rank 0 of 1.

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


def rng_state(device: torch.device) -> dict:
    """Every generator a training step draws from (dropout, Python and NumPy shuffles): saved per rank."""
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
