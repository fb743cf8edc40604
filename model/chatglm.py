"""ChatGLM-6B in one file: 2D rotary, prefix-LM attention, the block, the model (its config: config.py).

Module names follow the released model's weights (`transformer.layers.{i}.attention.query_key_value`, ...)
so a released state dict loads with `copy_` key by key and adapter key names follow for free.
The numbers this file must reproduce are written down in `../shared/docs/chatglm6b.md`.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import ChatGLMConfig
from .loss import linear_cross_entropy


# The residual scale is sqrt(2 * 28) for every model, whatever its depth: the reference's GLMBlock takes
# `num_layers=28` as a default argument that its ChatGLMModel never passes. For ChatGLM-6B (28 layers)
# this is the documented sqrt(2 L); for smaller test models it is what the reference computes.
REFERENCE_ALPHA_LAYERS = 28


# ---------------------------------------------------------------- positions and masks

def prompt_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor, config: ChatGLMConfig):
    """Per sequence: left-pad count o, index c of <sop>, index p of [gMASK] (or [MASK]), in padded coordinates.

    A sequence without <sop> is all prompt (c = T). Shapes: (B, T) -> three (B,) tensors.
    """
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    big = torch.full_like(idx, T)
    o = torch.where(attention_mask.bool(), idx, big).min(dim=1).values
    c = torch.where(input_ids == config.bos_token_id, idx, big).min(dim=1).values
    g = torch.where(input_ids == config.gmask_token_id, idx, big).min(dim=1).values
    m = torch.where(input_ids == config.mask_token_id, idx, big).min(dim=1).values
    p = torch.where(g < T, g, m)
    bad = (c < T) & (p >= c)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"sequence {row} has <sop> (id {config.bos_token_id}) but no [gMASK]/[MASK] before it; "
                         "prompts must end with [gMASK] <sop> (tokenizer.encode(text) adds them)")
    return o, c, p


def positions_2d(slots: torch.Tensor, o, c, p):
    """ChatGLM's two position streams for token slots `slots` (T,), counted on the unpadded sequence.

    position: 0..c-1 over the prompt, then the [gMASK] position p for every answer token;
    block position: 0 over the prompt, then 1, 2, 3, ... from <sop> on. Left pads get 0. -> two (B, T)
    """
    s, o, c, p = slots[None, :], o[:, None], c[:, None], p[:, None]
    in_prompt = s < c
    pos = torch.where(in_prompt, s - o, p - o).clamp(min=0)
    block = torch.where(in_prompt, torch.zeros_like(s), s - c + 1)
    return pos, block


def rotary_inv_freq(head_dim: int, device=None) -> torch.Tensor:
    # Each half of a head (r = d/2 dims) has its own rotary. The reference keeps inv_freq in
    # float16, so we round to float16 and compute in float32 (without it angles drift at pos > 100).
    r = head_dim // 2
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32, device=device) / r))
    return inv.half().float()  # (r/2,)


def rotary_cos_sin(pos, block, inv_freq):
    """(B, T) position streams -> cos, sin of shape (B, T, 1, d) in float32: first half by pos, second by block."""
    def half(t):
        ang = t.float()[..., None] * inv_freq  # (B, T, r/2)
        return torch.cat([ang, ang], dim=-1)  # (B, T, r)
    ang = torch.cat([half(pos), half(block)], dim=-1)[:, :, None, :]  # (B, T, 1, d)
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    # x (B, T, n, d). Within each half of size r: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1).
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)  # the two halves, (B, T, n, r)
    a1, a2 = a.chunk(2, dim=-1)
    b1, b2 = b.chunk(2, dim=-1)
    rot = torch.cat([-a2, a1, -b2, b1], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


# ---------------------------------------------------------------- the attention seam

ATTENTION_KERNELS = ("sdpa", "flex")  # model.transformer.attention: a run-time choice, same numbers


def prefix_lm_mask(kernel: str, key_valid, context, filled, T: int, P: int):
    """Which keys each query sees, built once per forward in the form `kernel` ("sdpa" or "flex") takes.

    Key slot j holds the P-Tuning prefix for j < P, then token slot j - P. `filled` (a 0-d tensor) counts
    the cache slots written before this call, so query i is token slot max(filled - P, 0) + i. Key j is
    visible when it is real (key_valid (B, S): False for pads) and either a prefix slot, in the
    bidirectional prompt (token slot < context, the index of <sop>) or not in the future. All of it comes
    from tensors, so a decode step keeps one shape and no host sync.
    -> (B, 1, T, S) bool for SDPA, a BlockMask for FlexAttention.
    """
    B, S = key_valid.shape

    def visible(b, h, i, j):  # FlexAttention's mask_mod: index tensors in, bool out
        # the tensors it reads are the caller's as they are: compiled CPU FlexAttention rejects computed ones
        token = j - P
        return key_valid[b, j] & ((token < context[b]) | (token <= (filled - P).clamp(min=0) + i))

    if kernel == "flex":
        return create_block_mask(visible, B, None, T, S, device=key_valid.device)
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; use one of {ATTENTION_KERNELS}")
    dev = key_valid.device
    b = torch.arange(B, device=dev)[:, None, None, None]
    i = torch.arange(T, device=dev)[None, None, :, None]
    j = torch.arange(S, device=dev)[None, None, None, :]
    return visible(b, None, i, j)  # (B, 1, T, S)


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention)


def attend(q, k, v, mask):
    """q (B, n, T, d) over k, v (B, n, S, d) -> (B, n, T, d); the one place the attention kernel is called.

    The kernel follows the mask: a BlockMask goes to FlexAttention, a bool tensor to SDPA.
    """
    if isinstance(mask, BlockMask):
        # Uncompiled, FlexAttention runs an unfused reference that materializes the scores. Inside a
        # compiled step it is fused with the step; in an eager model on CUDA the call is compiled alone
        # (as torchtune does). CPU keeps the reference there: torch 2.13's compiled CPU FlexAttention
        # fails to build once shapes vary. Contiguous: it also misreads a transposed query (T = 1: no copy).
        compile_alone = q.is_cuda and not torch.compiler.is_compiling()
        flex = compiled_flex_attention() if compile_alone else flex_attention
        return flex(q.contiguous(), k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values for generation, written by slot index (gpt-fast style).

    Slots hold the P-Tuning prefix (if any) then the tokens. Every step attends over all slots, with
    the slots not written yet masked out (they lie in the future), so a decode step has one shape
    whatever its position. `length` (slots filled so far) is a tensor for the same reason. `valid`
    marks slots a query may see (False for left pads); `spans` keeps each prompt's (o, c, p) so decode
    steps know their positions. Both are written once, at prefill.
    """

    def __init__(self, config: ChatGLMConfig, batch: int, max_slots: int, dtype, device):
        shape = (batch, config.num_attention_heads, max_slots, config.head_dim)
        # One tensor per layer, not views of one: compiled CPU FlexAttention misreads views of a larger buffer.
        # Zeros, not empty: masked slots get weight exactly 0, and 0 * NaN garbage would still be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.valid = torch.ones(batch, max_slots, dtype=torch.bool, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.spans = None
        for t in (*self.k, *self.v, self.valid, self.length):
            # the compiled decode step writes these in place: CUDA graphs keep their addresses as they are
            torch._dynamo.mark_static_address(t)

    def start(self, spans, key_valid):
        """Prefill: record the prompts' spans and which of the first slots are real (B, P + T)."""
        if key_valid.shape[1] > self.valid.shape[1]:
            raise ValueError(f"KV cache holds {self.valid.shape[1]} slots; the prompt needs {key_valid.shape[1]}")
        self.spans = spans
        for t in spans:
            torch._dynamo.mark_static_address(t)
        self.valid[:, :key_valid.shape[1]] = key_valid

    def update(self, layer: int, k, v):
        # k, v (B, n, T, d) written at slots length .. length + T - 1 -> all slots (B, n, S, d)
        slots = self.length + torch.arange(k.shape[2], device=k.device)  # (T,)
        return self.k[layer].index_copy_(2, slots, k), self.v[layer].index_copy_(2, slots, v)


# ---------------------------------------------------------------- the network

class Attention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n, self.d = config.num_attention_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, mask, prefix=None, cache=None):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n, 3 * self.d)  # head-major: head h owns 3d outputs
        q, k, v = qkv.split(self.d, dim=-1)  # (B, T, n, d) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n, T, d)
        if prefix is not None:  # P-Tuning v2 keys/values go in front, not rotated
            k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, n, S, d)
        y = attend(q, k, v, mask)  # (B, n, T, d)
        return self.dense(y.transpose(1, 2).reshape(B, T, self.n * self.d))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.alpha = math.sqrt(2 * REFERENCE_ALPHA_LAYERS)

    def forward(self, x, cos, sin, mask, prefix=None, cache=None):
        # ChatGLM's residual is the LayerNorm OUTPUT scaled by sqrt(2 L), not the block input.
        a = self.input_layernorm(x)
        h = a * self.alpha + self.attention(a, cos, sin, mask, prefix, cache)
        m = self.post_attention_layernorm(h)
        return m * self.alpha + self.mlp(m)


class Transformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        # P-Tuning v2 slot (adapters/ptuning.py): a module with `pre_seq_len` P mapping a batch
        # size B to prefix keys/values (B, P, 2*L*H). The base model leaves it empty.
        self.prefix_encoder = None
        # The attention kernel, "sdpa" or "flex" (prefix_lm_mask, attend). A run-time choice (train.py
        # --attention ...), not part of the weights: the numbers are the same within float rounding.
        self.attention = "sdpa"

    def prefix_kv(self, B: int):
        # (B, P, 2*L*H) -> (2L, B, n, P, d); layer l reads slot 2l as keys and 2l+1 as values.
        cfg = self.config
        kv = self.prefix_encoder(B)
        P = kv.shape[1]
        return kv.view(B, P, 2 * cfg.num_layers, cfg.num_attention_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = pad -> final hidden states (B, T, H).

        With a cache, the first call is the prefill (the prompts); each later call appends T real tokens
        (attention_mask is not read) and takes positions and masks from tensors only: one static graph.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        P = 0 if self.prefix_encoder is None else self.prefix_encoder.pre_seq_len
        prefill = cache is None or cache.spans is None
        if prefill:
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
            spans = prompt_spans(input_ids, attention_mask, self.config)
            key_valid = attention_mask.bool()  # (B, P + T): prefix slots are always real
            if P:
                key_valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=dev), key_valid], dim=1)
        prefix = self.prefix_kv(B) if P and prefill else None  # with a cache, written once at prefill
        if cache is None:
            filled = torch.zeros((), dtype=torch.long, device=dev)
        else:
            if prefill:
                cache.start(spans, key_valid)
            spans, key_valid, filled = cache.spans, cache.valid, cache.length  # key_valid: (B, S), all slots
        # token slot of input_ids[:, 0]; at prefill the prefix is written with the tokens
        slots = (filled - P).clamp(min=0) + torch.arange(T, device=dev)  # (T,)
        # inv_freq is recomputed (not a buffer) so that model.to(bfloat16) can never round it.
        cos, sin = rotary_cos_sin(*positions_2d(slots, *spans), rotary_inv_freq(self.config.head_dim, dev))
        mask = prefix_lm_mask(self.attention, key_valid, spans[1], filled, T, P)

        x = self.word_embeddings(input_ids)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            layer_prefix = None if prefix is None else (prefix[2 * i], prefix[2 * i + 1])
            x = layer(x, cos, sin, mask, layer_prefix, cache)
        if cache is not None:
            cache.length += (P if prefix is not None else 0) + T
        return self.final_layernorm(x)


class TiedLMHead(nn.Module):
    """The output layer of a tied model: the word embedding's own Parameter, looked up at each call.

    Assigning one Parameter to two modules (transformers' way) comes apart under `to_empty`,
    `load_state_dict(assign=True)` and FSDP2 sharding, which replace Parameters module by module; a
    lookup cannot. The matrix is registered once, as `transformer.word_embeddings.weight`.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a plain reference, not a submodule

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, h):
        return F.linear(h, self.weight)


class ChatGLMModel(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        if config.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.transformer.word_embeddings)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, logits_at=None, targets=None):
        """input_ids, attention_mask (B, T) -> logits (B, T, V), or with one of
        - `logits_at` (B, T) bool: the logits of the selected positions only, (N, V) in row order (generation
          projects each sequence's last position);
        - `targets` (B, T) long: the id each position must predict, IGNORE (-100) where none: the training
          loss, the SUM over positions with a target of float32 natural-log cross-entropies, a scalar. The
          output layer and the loss run fused by chunks of rows (model.loss): no (N, V) tensor is ever whole.
        """
        h = self.transformer(input_ids, attention_mask, cache)  # (B, T, H)
        if targets is not None:
            return linear_cross_entropy(h, self.lm_head.weight, targets)
        if logits_at is not None:
            h = h[logits_at]  # (N, H)
        return self.lm_head(h)

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        prefix = 0 if self.transformer.prefix_encoder is None else self.transformer.prefix_encoder.pre_seq_len
        p = self.lm_head.weight
        return KVCache(self.config, batch, prefix + max_tokens, p.dtype, p.device)

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random weights for presets and tests: normal(0, std) matrices and embeddings, zero biases, unit norms."""
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)
        return self

