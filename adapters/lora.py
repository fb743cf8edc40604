"""LoRA: a low-rank update beside chosen nn.Linear layers, y = x W^T + b + (alpha / r) B(A(dropout(x))).

`LoRALinear` replaces an `nn.Linear` in place and keeps the base parameters as its own `weight`
and `bias`, so the base key names do not change (`...query_key_value.weight`) and the LoRA
tensors sit beside them as `...query_key_value.lora_A.weight` / `.lora_B.weight`: PEFT's names
without its `base_model.model.` prefix. Init, scaling and merge follow PEFT (A kaiming-uniform
with a = sqrt 5, B zeros, scaling alpha / r, merge W += scaling * B @ A). An adapter is saved in
PEFT's layout: the keys under `base_model.model.`, beside PEFT's adapter_config.json.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.flags import COUNT, DROPOUT, POSITIVE

from .layers import parse_layers

TITLE = "LoRA"
HELP = "low-rank updates"
SETTINGS = ("target", "layers", "lora_rank", "lora_alpha", "lora_dropout", "lora_target")
PEFT_PREFIX = "base_model.model."

# --target -> module-name suffixes inside a layer
TARGETS = {
    "qkv": ["attention.query_key_value"],
    "dense": ["attention.dense"],
    "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "all": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}


def add_args(group):
    group.add_argument("--lora-rank", type=COUNT, help="LoRA rank r (default: 8)")
    group.add_argument("--lora-alpha", type=POSITIVE, help="LoRA alpha; scaling = alpha / r (default: 32)")
    group.add_argument("--lora-dropout", type=DROPOUT, help="dropout on the LoRA input (default: 0.1)")
    group.add_argument("--lora-target", default=None,
                       help="comma list of module names selected by suffix, as PEFT's target_modules "
                            "(e.g. 'query_key_value' or '25.attention.query_key_value'); overrides --target/--layers")


def settings(args, num_layers: int) -> dict:
    """Explicit --lora-target names leave `layers` None (and --layers unread)."""
    names = [t.strip() for t in args.lora_target.split(",") if t.strip()] if args.lora_target else None
    return {"target": args.target, "layers": None if names else parse_layers(args.layers, num_layers),
            "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "lora_target": names}


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank branch. The base `weight`/`bias` are the replaced layer's own
    Parameters (frozen, in the model's dtype); `lora_A`, `lora_B` are float32."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # a fresh adapter leaves the model unchanged
        self.merged = False  # True while the update is folded into `weight` (the branch is then skipped)
        self.base = None  # a model.quant.QuantLinear holding the frozen base in place of weight/bias (quantize_base)
        self.train(base.training)  # a new module starts in train mode; follow the layer it replaces

    @torch.no_grad()
    def delta(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in), float32

    def quantize_base(self, quantized: nn.Module):
        """Replace the frozen `weight`/`bias` by `quantized`, the same layer quantized (model.quant.quantize_model);
        the LoRA branch stays float32 and cannot be merged any more."""
        del self.weight, self.bias
        self.base = quantized

    @torch.no_grad()
    def merge(self):
        """W += scaling * B @ A, computed in float32 and stored in the base dtype."""
        if self.base is not None:
            raise ValueError("LoRA cannot be merged into quantized base weights: merge before quantizing "
                             "(evaluate.py keeps LoRA unmerged with --quantize)")
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta().to(self.weight.device)).to(self.weight.dtype))
            self.merged = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)
        if self.merged:
            return y
        # The branch runs on x cast to A's dtype (float32); under autocast the Linear layers still run
        # in half precision. Without autocast this makes a bf16 model with fp32 LoRA tensors work.
        z = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (z * self.scaling).to(y.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def layer_targets(target: str, layers: list[int]) -> list[str]:
    """--target and layer indices -> module names as PEFT's `target_modules` (`layers.25.attention.query_key_value`).

    The `layers.` prefix keeps PEFT's plain suffix match from also catching layers 15 and 25 for layer 5."""
    return [f"layers.{i}.{suffix}" for i in layers for suffix in TARGETS[target]]


def target_modules(spec) -> list[str]:
    """The spec's module names: the explicit --lora-target, else --target in --layers."""
    return spec.lora_target if spec.lora_target else layer_targets(spec.target, spec.layers)


def matches(name: str, target: str) -> bool:
    # PEFT semantics: select by suffix, on a dot boundary
    return name == target or name.endswith("." + target)


def module_names_hint(model: nn.Module) -> str:
    """A short list of the model's Linear module names: the distinct per-layer suffixes and one full name."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    suffixes = list(dict.fromkeys(re.sub(r"^.*layers\.\d+\.", "", n) for n in names))
    example = next((n for n in names if ".layers." in n), names[0] if names else "")
    return (f"the model's Linear modules are {suffixes} in layers 0-{model.config.num_layers - 1} "
            f"(full names like {example!r}); "
            "give a suffix ('query_key_value'), a layer-qualified suffix ('25.attention.query_key_value') "
            "or --target qkv/mlp/dense/all with --layers")


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Replace every nn.Linear whose name ends with one of `targets` by a LoRALinear. -> the replaced names.

    Only the LoRA tensors require grad afterwards (the caller froze the rest). A target that selects
    no Linear module is an error listing the names that exist.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    unmatched = [t for t in targets if not any(matches(n, t) for n in linears)]
    if unmatched:
        raise ValueError(f"LoRA target(s) {unmatched} match no Linear module; {module_names_hint(model)}")
    chosen = [n for n in linears if any(matches(n, t) for t in targets)]
    for name in chosen:
        if isinstance(linears[name], LoRALinear):
            raise ValueError(f"{name} already has LoRA; apply an adapter to a base model only once")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(linears[name], rank, alpha, dropout))
    return chosen


def apply(model: nn.Module, spec):
    apply_lora(model, target_modules(spec), spec.lora_rank, spec.lora_alpha, spec.lora_dropout)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight for good (inference, export) and put a plain nn.Linear
    back in place. In place; returns the model. (`LoRALinear.merge` folds one layer without removing it.)"""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: no second copy
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return model


merge = merge_lora  # the method table's name for it


def to_files(config, spec, tensors: dict) -> tuple[dict, dict]:
    """PEFT's layout: the keys under `base_model.model.`, and adapter_config.json."""
    files = {"adapter_config.json": peft_config(config.num_layers, spec)}
    return {PEFT_PREFIX + k: t for k, t in tensors.items()}, files


def peft_config(num_layers: int, spec) -> dict:
    """PEFT's adapter_config.json for a LoRA spec."""
    if spec.lora_target:
        targets = spec.lora_target
    elif spec.layers == list(range(num_layers)):
        targets = TARGETS[spec.target]  # every layer: the plain suffixes, as one would write them for PEFT
    else:
        targets = target_modules(spec)
    alpha = spec.lora_alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "inference_mode": True, "r": spec.lora_rank, "target_modules": list(targets),
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": spec.lora_dropout,
            "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None, "revision": None}
