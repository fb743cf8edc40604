"""LoRA: a low-rank update beside chosen nn.Linear layers, y = x W^T + b + (alpha / r) B(A(dropout(x))).

`LoRALinear` replaces an `nn.Linear` in place and keeps the base parameters as its own `weight`
and `bias`, so the base key names do not change (`...query_key_value.weight`) and the LoRA
tensors sit beside them as `...query_key_value.lora_A.weight` / `.lora_B.weight`: PEFT's names
without its `base_model.model.` prefix. Init, scaling and merge follow PEFT (A kaiming-uniform
with a = sqrt 5, B zeros, scaling alpha / r, merge W += scaling * B @ A).
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# --target -> module-name suffixes inside a layer
TARGETS = {
    "qkv": ["attention.query_key_value"],
    "dense": ["attention.dense"],
    "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "all": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}


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
        self.train(base.training)  # a new module starts in train mode; follow the layer it replaces

    @torch.no_grad()
    def delta(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in), float32

    @torch.no_grad()
    def merge(self):
        """W += scaling * B @ A, computed in float32 and stored in the base dtype."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta().to(self.weight.device)).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= scaling * B @ A: back to the base weight (exact in float32 up to rounding)."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta().to(self.weight.device)).to(self.weight.dtype))
            self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
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


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight for good (inference, export) and put a plain nn.Linear
    back in place. In place; returns the model. (`LoRALinear.merge` / `.unmerge` toggle without removing.)"""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: no second copy
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return model
