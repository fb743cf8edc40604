"""From command-line flags to a model with exactly the method's tensors trainable.

`add_adapter_args` -> `AdapterSpec.from_args` -> `apply_adapter(model, spec)`. One layer syntax
everywhere (`parse_layers`). For training, `float32_trainable(model)` then puts every trainable tensor in
float32, whatever the model's dtype: the model runs in bf16/fp16 under autocast while the optimizer updates
float32 weights.

`METHODS` is the table of fine-tuning methods, name -> the method's module. Each module defines
    TITLE, HELP                 its name in messages ("LoRA"); what it trains, for --method's help
    SETTINGS                    the AdapterSpec fields it uses: what adapter.json and the logs record
    add_args(group)             its own flags (--target and --layers are shared: defined here)
    settings(args, num_layers)  -> {field: value} for its SETTINGS, from the parsed flags
    apply(model, spec)          add its modules, set requires_grad on its tensors (all else is frozen)
    to_files(config, spec, tensors) -> (tensors under the file's key names, {name: dict} of JSON files
                                written beside them, e.g. PEFT's adapter_config.json)
    merge                       merge(model) -> model: the adapter folded into plain base weights, in place
                                (inference, export); None for a method that cannot be merged
"""
import argparse
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from model.quant import QuantLinear
from runtime.files import real_number

from . import freeze, full, lora, ptuning
from .layers import check_layers

METHODS = {"freeze": freeze, "ptuning": ptuning, "lora": lora, "full": full}
TARGETS = ("qkv", "mlp", "dense", "all")


def add_adapter_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("fine-tuning method (defaults: the study's settings)")
    g.add_argument("--method", choices=list(METHODS), default="lora",
                   help="; ".join(f"{name}: {method.HELP}" for name, method in METHODS.items()))
    users = "/".join(name for name, method in METHODS.items() if "layers" in method.SETTINGS)
    g.add_argument("--target", choices=TARGETS,
                   help=f"{users}: which matrices of the chosen layers: qkv = attention.query_key_value, "
                        "mlp = both MLP matrices, dense = attention.dense, all = all of them "
                        "(freeze 'all' also trains the layer norms) (default: qkv)")
    g.add_argument("--layers", help=f"{users}: '3' = the last 3 layers, '25-27', '0,5,9', 'all' (default: 3)")
    for method in METHODS.values():
        method.add_args(g)


@dataclass
class AdapterSpec:
    """What to train: the method and the settings of every method; each method reads its own SETTINGS, the
    others keep their defaults. `layers` is None for methods without layers and for explicit LoRA names."""
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
        """The method's settings from the flags; a method flag left unset (None) takes its default, and one
        set for a method that does not use it is an error (it would be silently ignored)."""
        method = METHODS[args.method]
        ignored = [k for k in FLAG_DEFAULTS if k not in method.SETTINGS and getattr(args, k, None) not in (None, False)]
        if ignored:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise ValueError(f"--method {args.method} does not use {flags}: {method.TITLE} takes only "
                             f"{', '.join('--' + k.replace('_', '-') for k in method.SETTINGS) or 'no settings'}")
        filled = argparse.Namespace(**{k: default if getattr(args, k, None) is None else getattr(args, k)
                                       for k, default in FLAG_DEFAULTS.items()})
        return cls(method=args.method, **method.settings(filled, num_layers))

    def to_dict(self) -> dict:
        """The method and the settings that matter to it (adapter.json, logs)."""
        keep = METHODS[self.method].SETTINGS
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if k in keep}}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterSpec":
        if d.get("method") not in METHODS:
            raise ValueError(f"adapter settings {d}: 'method' must be one of {list(METHODS)}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def problems(self, config) -> list[str]:
        """What makes these settings impossible for a model of `config`, for settings read from a file a hand may
        have edited (the flags are checked when parsed): only the fields the method uses."""
        top, width = config.num_layers - 1, config.hidden_size

        def whole(v, lo, hi):
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        checks = {"target": (self.target in TARGETS, f"one of {', '.join(TARGETS)}"),
                  "layers": (isinstance(self.layers, list) and self.layers != [] and all(
                      whole(i, 0, top) for i in self.layers) or self.layers is None and self.method == "lora" and (
                      isinstance(self.lora_target, list) and self.lora_target != []),
                             f"a list of layer numbers 0-{top}"),
                  "lora_rank": (whole(self.lora_rank, 1, width), f"a whole number 1-{width}"),
                  "lora_alpha": (real_number(self.lora_alpha) and 0 < self.lora_alpha <= 2 ** 16,
                                 "a positive number up to 65536"),
                  "lora_dropout": (real_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "a number in [0, 1)"),
                  "lora_target": (self.lora_target is None or isinstance(self.lora_target, list) and all(
                      isinstance(t, str) and t for t in self.lora_target), "a list of module names"),
                  "pre_seq_len": (whole(self.pre_seq_len, 1, config.max_sequence_length),
                                  f"a whole number 1-{config.max_sequence_length} (the model's max_sequence_length)"),
                  "prefix_projection": (isinstance(self.prefix_projection, bool), "true or false")}
        keep = METHODS[self.method].SETTINGS
        return [f"{k} is {getattr(self, k)!r:.60}, expected {want}" for k, (ok, want) in checks.items()
                if k in keep and not ok]


# The method flags (unset: None) and their defaults: the study's settings, AdapterSpec's defaults; --layers
# (the spec's explicit list) defaults to the last 3 layers.
FLAG_DEFAULTS = {f.name: f.default for f in fields(AdapterSpec) if f.name != "method"} | {"layers": "3"}


def apply_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Add the method's modules and set requires_grad (only the method's tensors), changing no base dtype.

    New LoRA / prefix tensors are float32 on the model's device (meta included); tensors of the base that the
    method trains keep the model's dtype (loaded Freeze weights: a bf16 model stays bf16 and runs without
    autocast). Training then calls `float32_trainable`.
    """
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {list(METHODS)}")
    method = METHODS[spec.method]
    if "layers" in method.SETTINGS and spec.layers is not None:
        check_layers(spec.layers, model.config.num_layers)
    model.requires_grad_(False)
    method.apply(model, spec)
    return model


def float32_trainable(model: nn.Module) -> nn.Module:
    """Every tensor that requires grad in float32, in place (the optimizer's master weights)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # same Parameter object, float32 storage
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that require grad, under the model's key names (what an adapter's files hold)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def trainable_report(model: nn.Module) -> str:
    """The line the study's code printed. Counts only: works on a meta-device model. A quantized weight (a buffer)
    counts as the parameters it stands for."""
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:d} || all params: {total:d} || trainable%: {100 * trainable / total:.4f}"
