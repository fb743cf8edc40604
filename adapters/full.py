"""Full fine-tuning: every weight of the model trains, and the adapter is the whole state dict.

Nothing is added to the model; the "adapter" files hold the released key names, so merging it is
loading it. With several processes, train.py --dist fsdp shards it (FSDP2).
"""
import torch.nn as nn

TITLE = "full fine-tuning"
HELP = "every weight"
SETTINGS = ()


def add_args(group):
    """Full fine-tuning has no settings."""


def settings(args, num_layers: int) -> dict:
    return {}


def apply(model: nn.Module, spec):
    model.requires_grad_(True)


def to_files(config, spec, tensors: dict) -> tuple[dict, dict]:
    return tensors, {}  # the released model's own key names; no other file


def merge(model: nn.Module) -> nn.Module:
    return model  # the trained tensors are the base weights
