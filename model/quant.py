"""Quantized frozen weights in plain PyTorch: int8 per output channel, int4 in groups of 128 inputs.

`quantize_model(model, mode)` swaps the frozen Linear layers of the transformer blocks (query_key_value,
dense, dense_h_to_4h, dense_4h_to_h) for `QuantLinear`s, in place. The embeddings, the layer norms, the
output layer, every bias and every trained tensor keep their dtype. Symmetric, no zero point: w ~ q * s.
- int8: q in [-127, 127], one scale per output row (its absmax / 127): 1 byte per weight.
- int4: q in [-8, 7] stored as q + 8, two per byte (in a group of g columns, byte j holds column j in its low
  nibble and column j + g/2 in its high one: unpacking is two contiguous halves), one scale per row and group
  of 128 input columns (absmax / 7): half a byte per weight. An input width that the group size does not
  divide gets a last group padded with zeros (stored, never read).
Scales are stored in the weight's dtype (bf16, fp16 or fp32). The quantized tensors are buffers: never
trained, never in the optimizer or an adapter file, identical on every rank. A layer's float weight exists
only for its own matmul (forward dequantizes it), so memory holds one float layer at a time.

Under torch.compile, a call with at most FUSED_ROWS rows (a decode step: one token per sequence) takes the fused
form instead: the dequantization, the products and the sum written as one expression, which the compiler turns
into a reduction kernel that reads each int8 or packed byte once and never stores a float weight. A decode step of
one sequence is bound by the bytes it reads, and int8 / int4 blocks read 4x / 8x fewer than float32 (BENCHMARKS.md:
1.7x / 1.6x the compiled float32 step on a 2-core CPU at ChatGLM-6B's shape). The fused form converts each weight
once per row, so rows cost arithmetic: many rows (prefill, training) keep dequantize + matmul, which reuses each
float weight for every row, and so do eager calls, where the expression would materialize a (rows, out, in) tensor.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .chatglm import ChatGLMModel

MODES = ("none", "int8", "int4")
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # module names inside a block
GROUP_SIZE = 128
FUSED_ROWS = 32  # compiled calls with up to this many rows take the fused form: on the CPU measured, it beats
# dequantize + matmul up to 32 rows (evaluate.py's default batch); not yet measured on a GPU
TINY = torch.finfo(torch.float32).tiny  # an all-zero row or group: scale 0, q 0 (no 0 / 0)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> q (out, in) int8, scales (out,) in w's dtype."""
    scales = (w.float().abs().amax(dim=1) / 127).to(w.dtype)  # rounded first: q is chosen for the stored scale
    q = torch.round(w.float() / scales.float().clamp(min=TINY)[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> q (out, G * group_size / 2) uint8, two values a byte; scales (out, G) in w's dtype."""
    out, width = w.shape
    groups = -(-width // group_size)
    padded = F.pad(w.float(), (0, groups * group_size - width)).view(out, groups, group_size)
    scales = (padded.abs().amax(dim=2) / 7).to(w.dtype)  # (out, G)
    q = torch.round(padded / scales.float().clamp(min=TINY)[..., None]).clamp(-8, 7)  # (out, G, g)
    u = (q + 8).to(torch.uint8)  # (out, G, g) in [0, 15]
    half = group_size // 2
    return (u[..., :half] | (u[..., half:] << 4)).flatten(1), scales


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, G * g / 2) uint8 -> (out, G, g) uint8 in [0, 15] (q + 8), the columns in their order."""
    p = packed.view(packed.shape[0], -1, group_size // 2)  # (out, G, g/2)
    return torch.cat([p & 15, p >> 4], dim=-1)


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored quantized (buffers `qweight`, `scales`) and dequantized at
    each call; the bias stays a frozen Parameter in its dtype. forward(x) -> x W^T + b, as the Linear did."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = GROUP_SIZE,
                 device=None):
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"QuantLinear mode must be 'int8' or 'int4', got {mode!r}")
        if mode == "int4" and (group_size < 2 or group_size % 2):
            raise ValueError(f"int4 group size must be even (two values a byte), got {group_size}")
        self.out_features, self.in_features = weight.shape
        self.mode, self.group_size = mode, group_size
        w = weight.detach().to(device)
        q, scales = quantize_int8(w) if mode == "int8" else quantize_int4(w, group_size)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) in the scales' dtype (the model's)."""
        if self.mode == "int8":
            return self.qweight.to(self.scales.dtype) * self.scales[:, None]
        q = unpack_int4(self.qweight, self.group_size)  # (out, G, g)
        w = q.to(self.scales.dtype).sub_(8).mul_(self.scales[..., None])  # in place: one float copy, not three
        return w.flatten(1)[:, :self.in_features]

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x W^T (..., out), the dequantization inside the sum (see the module docstring)."""
        dtype = self.scales.dtype
        if self.mode == "int8":
            return (x[..., None, :] * self.qweight.to(dtype)).sum(-1) * self.scales  # (..., out, in) summed
        half = self.group_size // 2
        u = self.qweight.view(self.out_features, -1, half)  # (out, G, g/2): byte j = columns j and j + g/2
        x = F.pad(x, (0, u.shape[1] * self.group_size - self.in_features))  # the padded group's zeros
        x = x.unflatten(-1, (u.shape[1], 2, half))[..., None, :, :, :]  # (..., 1, G, 2, g/2)
        low, high = (u & 15).to(dtype) - 8, (u >> 4).to(dtype) - 8  # (out, G, g/2) each
        per_group = (x[..., 0, :] * low + x[..., 1, :] * high).sum(-1)  # (..., out, G)
        return (per_group * self.scales).sum(-1)

    def forward(self, x):
        if torch.compiler.is_compiling() and x.numel() <= FUSED_ROWS * x.shape[-1]:
            y = self.fused(x)
            return y if self.bias is None else y + self.bias
        if self.mode == "int8":  # a row's scale commutes with the matmul: scale its output, not the whole weight
            y = F.linear(x, self.qweight.to(self.scales.dtype)) * self.scales
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(), self.bias)

    def extra_repr(self):
        group = f", group={self.group_size}" if self.mode == "int4" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.mode}{group}"


@torch.no_grad()
def quantize_model(model: ChatGLMModel, mode: str, device=None, group_size: int = GROUP_SIZE) -> list[str]:
    """Quantize the frozen (requires_grad False) TARGETS Linears of every block, in place, onto `device` (default:
    where each weight is; the caller moves the rest with model.to(device)). -> the quantized module names.

    A Linear whose weight or bias trains (Freeze) stays float. A LoRALinear (adapters/lora.py) keeps its float32
    LoRA branch and hands its frozen base to the QuantLinear. Quantizing layer by layer onto the device means a
    model loaded on the CPU never needs its float weights on the accelerator.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {list(MODES)}")
    if mode == "none":
        return []
    names = []
    for name, m in list(model.transformer.layers.named_modules()):
        if name.rpartition(".")[2] not in TARGETS:
            continue
        if isinstance(m, QuantLinear):
            raise ValueError(f"transformer.layers.{name} is quantized already; quantize a model only once")
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        quantized = QuantLinear(m.weight, m.bias, mode, group_size, device)
        if isinstance(m, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.transformer.layers.get_submodule(parent), child, quantized)
        else:
            m.quantize_base(quantized)
        names.append(f"transformer.layers.{name}")
    return names


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a shared tensor once): what its weights occupy."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def base_weight_bytes(config, dtype: torch.dtype, mode: str) -> int:
    """Bytes of the base model's weights in `dtype` with the blocks' Linears quantized by `mode`, from the config
    alone (a meta-device model: no memory, any size)."""
    with torch.device("meta"):
        model = ChatGLMModel(config).to(dtype).requires_grad_(False)
    quantize_model(model, mode)
    return tensor_bytes(model)
