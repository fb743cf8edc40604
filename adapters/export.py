"""Merge an adapter into its base model and write the result as a released-layout checkpoint.

    python -m adapters --model BASE --checkpoint ADAPTER_DIR --output OUT_DIR [--dtype bf16]

Each method merges itself (`merge` in adapters/<method>.py): LoRA updates are folded into the weights
(W += scaling * B @ A); Freeze / full weights replace the base's. The output loads with
`model.load_model(OUT_DIR)`. A method without `merge` (P-Tuning v2: its prefix keys/values are extra
inputs of every layer, not a change of any weight) is refused before the base is loaded.
"""
import argparse
from pathlib import Path

import torch
from safetensors import safe_open

from model import PRESETS, load_config, load_model, save_checkpoint
from model.loader import checkpoint_files, read_shard
from model.tokenizer import DEMO_TOKENIZER
from runtime import DTYPES

from .checkpoint import check_base_weights, copy_weights, read_adapter
from .dispatch import METHODS, attach_adapter


def stored_dtype(base: str) -> torch.dtype:
    """The dtype a checkpoint directory stores its weights in (a preset: float32)."""
    if base in PRESETS:
        return torch.float32
    file = checkpoint_files(Path(base))[0]
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_slice(next(iter(f.keys())))[0:1].dtype
    return next(iter(read_shard(file).values())).dtype  # memory-mapped: one tensor's dtype, nothing read


def export_merged(base_path, adapter_dir, out_dir, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Base (preset or checkpoint directory) + adapter -> a checkpoint directory in the released layout.

    Loaded once on CPU in `dtype` (default: the base's stored dtype); the adapter is merged in place,
    so the model never exists twice. The tokenizer comes along: the base's ice_text.model, or the
    bundled demo tokenizer for the 'tiny' preset.
    """
    base = str(base_path)
    spec, file = read_adapter(adapter_dir, load_config(base))  # checks the adapter against the base before loading
    method = METHODS[spec.method]
    if method.merge is None:
        raise ValueError(f"{adapter_dir}: a {method.TITLE} adapter cannot be merged into the weights (the released "
                         f"layout has no place for its tensors: adapters/{spec.method}.py); use the base model plus "
                         "the adapter instead (evaluate.py --model BASE --checkpoint ADAPTER_DIR)")
    if base == "tiny":
        tokenizer = DEMO_TOKENIZER
        if not tokenizer.is_file():
            raise FileNotFoundError(f"{tokenizer}: the demo tokenizer is missing (data/demo/make_demo.py builds it)")
    elif base in PRESETS:
        tokenizer = None
    else:
        tokenizer = Path(base) / "ice_text.model"
        tokenizer = tokenizer if tokenizer.is_file() else None
    model = load_model(base, dtype=stored_dtype(base) if dtype is None else dtype)
    attach_adapter(model, spec)
    check_base_weights(model, adapter_dir, force)
    copy_weights(model, file)
    method.merge(model)
    return save_checkpoint(model.state_dict(), model.config, out_dir, tokenizer_file=tokenizer)


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge an adapter (LoRA, Freeze, full) into its base model and write "
                                            "a checkpoint directory that load_model reads.")
    p.add_argument("--model", required=True,
                   help=f"the base: a checkpoint directory or a preset ({', '.join(PRESETS)})")
    p.add_argument("--checkpoint", required=True,
                   help="the adapter directory (adapter.json, or a PEFT LoRA adapter_config.json)")
    p.add_argument("--output", required=True, help="the directory to write (replaced if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the dtype the base is stored in")
    p.add_argument("--force", action="store_true", help="merge even if the adapter was trained on other base weights")
    args = p.parse_args(argv)
    out = export_merged(args.model, args.checkpoint, args.output, DTYPES[args.dtype] if args.dtype else None,
                        args.force)
    print(f"[export] {args.checkpoint} + {args.model} -> {out}")
