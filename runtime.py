"""What train.py, evaluate.py and the benchmarks share: precision names and the torchrun set-up."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
