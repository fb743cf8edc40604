"""Merge an adapter into its base model and write the result as a model directory in the released layout; or
write a LoRA adapter's weights as PEFT's adapter_model.bin too.

    python -m adapters --model BASE --adapter ADAPTER_DIR --output OUT_DIR [--precision bf16]
    python -m adapters --peft-bin ADAPTER_DIR

Each method merges itself (`merge` in adapters/<method>.py): LoRA updates are folded into the weights
(W += scaling * B @ A); Freeze / full weights replace the base's. The output loads with
`model.loader.load_model(OUT_DIR)`, and with transformers as the release does (`AutoModel.from_pretrained(OUT_DIR,
trust_remote_code=True)`) when the base directory holds the released .py files: they are copied along. A method
without `merge` (P-Tuning v2: its prefix keys/values are extra inputs of every layer, not a change of any
weight) is refused before the base is loaded.
"""
import argparse
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import PRESETS
from model.loader import weight_files, load_config, load_model, read_shard, save_model
from model.tokenizer import DEMO_TOKENIZER
from runtime.precision import DTYPES

from .dispatch import METHODS
from .files import load_adapter, read_adapter, write_peft_bin


def stored_dtype(base: str) -> torch.dtype:
    """The dtype a model directory stores its weights in (a preset: float32)."""
    if base in PRESETS:
        return torch.float32
    file = weight_files(Path(base))[0]
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_slice(next(iter(f.keys())))[0:1].dtype
    return next(iter(read_shard(file).values())).dtype  # memory-mapped: one tensor's dtype, nothing read


# The released model's code and tokenizer settings, copied from a base directory that has them.
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py",
               "tokenizer_config.json")


def base_tokenizer(base: str) -> Path | None:
    """The base's ice_text.model, or the bundled demo tokenizer for the 'tiny' preset (None for other presets)."""
    if base == "tiny":
        if not DEMO_TOKENIZER.is_file():
            raise FileNotFoundError(f"{DEMO_TOKENIZER}: the demo tokenizer is missing (data/demo/make_demo.py "
                                    "builds it)")
        return DEMO_TOKENIZER
    tokenizer = Path(base) / "ice_text.model"
    return tokenizer if base not in PRESETS and tokenizer.is_file() else None


def export_merged(base_path, adapter_dir, out_dir, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Base (preset or model directory) + adapter -> a model directory in the released layout.

    Loaded once on CPU in `dtype` (default: the base's stored dtype); the adapter is merged in place,
    so the model never exists twice. The tokenizer comes along (`base_tokenizer`), and so do the base's
    REMOTE_CODE files.
    """
    base = str(base_path)
    spec, _ = read_adapter(adapter_dir, load_config(base))  # checks the adapter against the base before loading
    method = METHODS[spec.method]
    if method.merge is None:
        raise ValueError(f"{adapter_dir}: a {method.TITLE} adapter cannot be merged into the weights (the released "
                         f"layout has no place for its tensors: adapters/{spec.method}.py); use the base model plus "
                         "the adapter instead (evaluate.py --model BASE --run ADAPTER_DIR)")
    tokenizer = base_tokenizer(base)
    code = [] if base in PRESETS else [Path(base) / n for n in REMOTE_CODE if (Path(base) / n).is_file()]
    model = load_model(base, dtype=stored_dtype(base) if dtype is None else dtype)
    load_adapter(model, adapter_dir, force)
    method.merge(model)
    return save_model(model.state_dict(), model.config, out_dir, tokenizer_file=tokenizer, copy_files=code)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m adapters", description=(
        "Merge an adapter (LoRA, Freeze, full) into its base model and write a model directory that load_model "
        "and transformers read; or, with --peft-bin, write a LoRA adapter's adapter_model.bin for PEFT <= 0.3."))
    p.add_argument("--model", help=f"the base: a model directory or a preset ({', '.join(PRESETS)})")
    p.add_argument("--adapter", "--checkpoint", dest="adapter",
                   help="the adapter directory: a run of train.py (adapter.json) or a PEFT LoRA adapter "
                        "(adapter_config.json) (--checkpoint: the same, its former name)")
    p.add_argument("--output", help="the directory to write (replaced if it exists)")
    p.add_argument("--precision", choices=sorted(DTYPES), default=None,
                   help="the dtype the merged weights are stored in (default: the one the base is stored in)")
    p.add_argument("--force", action="store_true", help="merge even if the adapter was trained on other base weights")
    p.add_argument("--peft-bin", metavar="ADAPTER_DIR",
                   help="instead of merging: write adapter_model.bin beside a LoRA adapter's adapter_model.safetensors "
                        "(the same tensors under the same keys), the only file PEFT <= 0.3 reads")
    args = p.parse_args(argv)
    if args.peft_bin:
        if args.model or args.adapter or args.output:
            p.error("--peft-bin takes only the adapter directory (no --model, --adapter or --output)")
        print(f"[export] {write_peft_bin(args.peft_bin)}")
        return
    missing = [f"--{name}" for name in ("model", "adapter", "output") if getattr(args, name) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)} (or --peft-bin ADAPTER_DIR)")
    out = export_merged(args.model, args.adapter, args.output,
                        DTYPES[args.precision] if args.precision else None, args.force)
    print(f"[export] {args.adapter} + {args.model} -> {out}")
