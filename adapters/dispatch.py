"""From command-line flags to a model with exactly the method's tensors trainable.

`add_adapter_args` -> `AdapterSpec.from_args` -> `apply_adapter(model, spec)`. One layer syntax
everywhere (`parse_layers`). Every trainable tensor ends up in float32, whatever the model's dtype:
the model runs in bf16/fp16 under autocast while the optimizer updates float32 weights.
"""
import argparse
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from . import freeze, lora, ptuning

METHODS = ("freeze", "ptuning", "lora", "full")
TARGETS = ("qkv", "mlp", "dense", "all")


def add_adapter_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("fine-tuning method (defaults: the study's settings)")
    g.add_argument("--method", choices=METHODS, default="lora",
                   help="freeze: train chosen weights of chosen layers; ptuning: P-Tuning v2 prefixes; "
                        "lora: low-rank updates; full: every weight")
    g.add_argument("--target", choices=TARGETS, default="qkv",
                   help="freeze/lora: which matrices of the chosen layers: qkv = attention.query_key_value, "
                        "mlp = both MLP matrices, dense = attention.dense, all = all of them "
                        "(freeze 'all' also trains the layer norms)")
    g.add_argument("--layers", default="3",
                   help="freeze/lora: '3' = the last 3 layers, '25-27', '0,5,9', 'all'")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha; scaling = alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input")
    g.add_argument("--lora-target", default=None,
                   help="comma list of module names selected by suffix, as PEFT's target_modules "
                        "(e.g. 'query_key_value' or '25.attention.query_key_value'); overrides --target/--layers")
    g.add_argument("--pre-seq-len", type=int, default=16, help="P-Tuning v2 prefix length")
    g.add_argument("--prefix-projection", action="store_true",
                   help="P-Tuning v2: encode the prefix with a 2-layer MLP")


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'3' -> the last 3 layers; '0-2', '25-27' -> inclusive ranges; '0,5,9' -> those layers; 'all'.

    Items of a comma list may be ranges ('0-2,9'). Sorted, without repeats. A layer the model does not
    have is an error that names the model's depth.
    """
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_layers))
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= num_layers:
            raise ValueError(f"--layers {spec}: cannot take the last {n} layers: the model has {num_layers} layers "
                             f"(0-{num_layers - 1})")
        return list(range(num_layers - n, num_layers))
    layers = set()
    for item in spec.split(","):
        lo, dash, hi = item.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"--layers {spec!r}: expected 'N' (the last N layers), 'A-B', 'A,B,C' or 'all'")
        lo, hi = int(lo), int(hi) if dash else int(lo)
        if hi < lo:
            raise ValueError(f"--layers {spec!r}: range {lo}-{hi} is empty; write it low-high")
        layers.update(range(lo, hi + 1))
    check_layers(sorted(layers), num_layers)
    return sorted(layers)


def check_layers(layers: list[int], num_layers: int):
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        which = f"layer {bad[0]} does not" if len(bad) == 1 else f"layers {', '.join(map(str, bad))} do not"
        raise ValueError(f"{which} exist: the model has {num_layers} layers (0-{num_layers - 1})")


@dataclass
class AdapterSpec:
    """What to train. `layers` is None for methods that have none (ptuning, full) and for explicit LoRA names."""
    method: str = "lora"
    target: str = "qkv"
    layers: list[int] | None = None
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_target: list[str] | None = None
    pre_seq_len: int = 16
    prefix_projection: bool = False

    @classmethod
    def from_args(cls, args, num_layers: int) -> "AdapterSpec":
        lora_target = [t.strip() for t in args.lora_target.split(",") if t.strip()] if args.lora_target else None
        uses_layers = args.method == "freeze" or (args.method == "lora" and not lora_target)
        return cls(method=args.method, target=args.target,
                   layers=parse_layers(args.layers, num_layers) if uses_layers else None,
                   lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                   lora_target=lora_target if args.method == "lora" else None,
                   pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection)

    def to_dict(self) -> dict:
        """The method and the settings that matter to it (adapter.json, logs)."""
        keep = {"freeze": ("target", "layers"),
                "lora": ("target", "layers", "lora_rank", "lora_alpha", "lora_dropout", "lora_target"),
                "ptuning": ("pre_seq_len", "prefix_projection"),
                "full": ()}[self.method]
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if k in keep}}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterSpec":
        if d.get("method") not in METHODS:
            raise ValueError(f"adapter settings {d}: 'method' must be one of {METHODS}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lora_modules(self) -> list[str]:
        """LoRA's target module names: the explicit --lora-target, else --target in --layers."""
        return self.lora_target if self.lora_target else lora.layer_targets(self.target, self.layers)


def attach_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Add the method's modules and set requires_grad (only the method's tensors), changing no base dtype.

    New LoRA / prefix tensors are float32 on the model's device (meta included). `apply_adapter` is this
    plus float32 trainable weights; `load_adapter` uses this alone so that loaded Freeze weights keep
    the model's dtype and the model runs without autocast.
    """
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {METHODS}")
    model.requires_grad_(spec.method == "full")
    if spec.method in ("freeze", "lora") and spec.layers is not None:
        check_layers(spec.layers, model.config.num_layers)
    if spec.method == "freeze":
        freeze.apply_freeze(model, spec.target, spec.layers)
    elif spec.method == "ptuning":
        ptuning.apply_ptuning(model, spec.pre_seq_len, spec.prefix_projection)
    elif spec.method == "lora":
        lora.apply_lora(model, spec.lora_modules(), spec.lora_rank, spec.lora_alpha, spec.lora_dropout)
    return model


def apply_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Prepare `model` for training with `spec`, in place: only the method's tensors require grad, all float32."""
    attach_adapter(model, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # same Parameter object, float32 storage
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that require grad, under the model's key names (what an adapter checkpoint holds)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def trainable_report(model: nn.Module) -> str:
    """The line the study's code printed. Counts only: works on a meta-device model."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:d} || all params: {total:d} || trainable%: {100 * trainable / total:.4f}"
