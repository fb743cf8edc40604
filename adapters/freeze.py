"""Freeze: train a few of the base model's own weights, freeze the rest (the study's definition).

A parameter is trainable when its name contains `layers.{i}.{part}` for a chosen layer i; the
part is the MLP, the QKV matrix, the attention output, or the whole layer. Nothing is added to
the model, so a Freeze adapter is a subset of the released state dict, under the same keys,
and merging it is loading it.
"""
import torch.nn as nn

from .layers import parse_layers

TITLE = "Freeze"
HELP = "train chosen weights of chosen layers"
SETTINGS = ("target", "layers")

# --target -> the part of `layers.{i}.` that is trained
TARGETS = {
    "mlp": "mlp",
    "qkv": "attention.query_key_value",
    "dense": "attention.dense",
    "all": "",
}


def apply_freeze(model: nn.Module, target: str, layers: list[int]) -> list[str]:
    """Set requires_grad on the chosen weights (the caller froze everything before). -> their names."""
    if target not in TARGETS:
        raise ValueError(f"unknown Freeze target {target!r}; choose one of {sorted(TARGETS)}")
    needles = [f"layers.{i}.{TARGETS[target]}" for i in layers]
    chosen = []
    for name, p in model.named_parameters():
        # "layers.2.mlp" is not a substring of "layers.12.mlp": the dot after "layers" anchors the index
        if any(n in name for n in needles):
            p.requires_grad_(True)
            chosen.append(name)
    if not chosen:
        raise ValueError(f"Freeze target {target!r} in layers {layers} selects no parameter of this model")
    return chosen


def add_args(group):
    """Freeze has no flags of its own: it trains --target in --layers (shared with LoRA, adapters/dispatch.py)."""


def settings(args, num_layers: int) -> dict:
    return {"target": args.target, "layers": parse_layers(args.layers, num_layers)}


def apply(model: nn.Module, spec):
    apply_freeze(model, spec.target, spec.layers)


def to_files(config, spec, tensors: dict) -> tuple[dict, dict]:
    return tensors, {}  # the released model's own key names; no other file


def merge(model: nn.Module) -> nn.Module:
    return model  # the trained tensors are base weights already
