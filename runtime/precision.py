"""The one precision flag of every command, --precision bf16|fp16|fp32, and its one default rule.

Unset, a command computes in bf16 on CUDA and in fp32 on a CPU: every GPU this code targets has fast bf16
matmuls, a CPU only with AVX512-BF16 or AMX units (ask for --precision bf16 there). Where a command keeps
weights (train.py's frozen base, evaluate.py's model) they are stored in this dtype too.
"""
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_HELP = "default: bf16 on CUDA, fp32 on a CPU"


def add_precision_arg(group, help: str):
    """--precision on an argparse group; unset (None) until `precision` resolves it."""
    group.add_argument("--precision", choices=sorted(DTYPES), default=None, help=f"{help} ({DEFAULT_HELP})")


def precision(name: str | None, device_type: str | None = None) -> str:
    """The precision asked for, else the default for the device type (None: CUDA when a GPU is visible)."""
    if name is not None:
        return name
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if device_type == "cuda" else "fp32"
