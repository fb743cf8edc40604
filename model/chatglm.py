"""ChatGLM-6B in one file: config, 2D rotary, prefix-LM attention, the block, the model.

Module names follow the released checkpoint (`transformer.layers.{i}.attention.query_key_value`, ...)
so a released state dict loads with `copy_` key by key and adapter key names follow for free.
The numbers this file must reproduce are written down in `../shared/docs/chatglm6b.md`.
"""
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loss import linear_cross_entropy


@dataclass
class ChatGLMConfig:
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3
    pre_seq_len: int | None = None  # P-Tuning v2 prefix length, set by adapters.ptuning
    prefix_projection: bool = False
    # One matrix for the input embedding and the output layer. True when config.json lacks the key, as in
    # transformers, which the study ran: the released config lacks it, so the study's ChatGLM-6B projected
    # with its embedding matrix (6,173,286,400 parameters, not 6,707,929,088; see model.loader for a stored
    # lm_head.weight).
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str) -> "ChatGLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}, or a checkpoint directory")
        return cls(**PRESETS[name])

    @classmethod
    def from_json(cls, path) -> "ChatGLMConfig":
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        known = {f.name for f in fields(cls)}
        if not raw.get("position_encoding_2d", True):
            raise ValueError(f"{path}: position_encoding_2d=false is not ChatGLM-6B; only the 2D rotary model is implemented")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict:
        return {**asdict(self), "position_encoding_2d": True, "model_type": "chatglm"}


PRESETS = {
    "chatglm-6b": {},
    # The built-in demo model. Its special-token ids are those of the bundled demo tokenizer
    # (data/demo/ice_text.model), whose pieces are laid out by data/demo/make_demo.py.
    # Untied: with random weights (tests, smoke runs) a tied model decodes greedily to one repeated token,
    # since its hidden state stays close to the input embedding, which the tied output layer scores highest.
    # The demo trains this preset from scratch (--method full) and exports it with this choice in config.json.
    "tiny": dict(vocab_size=4096, hidden_size=128, num_layers=6, num_attention_heads=4, inner_hidden_size=512,
                 max_sequence_length=1024, mask_token_id=4, gmask_token_id=5, bos_token_id=8, eos_token_id=9,
                 pad_token_id=3, tie_word_embeddings=False),
}


# The residual scale is sqrt(2 * 28) for every model, whatever its depth: the reference's GLMBlock takes
# `num_layers=28` as a default argument that its ChatGLMModel never passes. For ChatGLM-6B (28 layers)
# this is the documented sqrt(2 L); for smaller test checkpoints it is what the reference computes.
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


# ---------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values for generation, written by slot index (gpt-fast style).

    Slots hold the P-Tuning prefix (if any) then the tokens; `valid` marks slots a query may see
    (False for left pads). `spans` keeps each prompt's (o, c, p) so decode steps know their positions.
    """

    def __init__(self, config: ChatGLMConfig, batch: int, max_slots: int, dtype, device):
        shape = (config.num_layers, batch, config.num_attention_heads, max_slots, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_slots, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (prefix included)
        self.spans = None

    def update(self, layer: int, k, v):
        # k, v (B, n, T, d) -> all keys/values so far (B, n, length + T, d)
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} slots; this step needs {end}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ---------------------------------------------------------------- the network

class Attention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n, self.d = config.num_attention_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, visible, prefix=None, cache=None):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n, 3 * self.d)  # head-major: head h owns 3d outputs
        q, k, v = qkv.split(self.d, dim=-1)  # (B, T, n, d) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n, T, d)
        if prefix is not None:  # P-Tuning v2 keys/values go in front, not rotated
            k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, n, S, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])  # (B, n, T, d)
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

    def forward(self, x, cos, sin, visible, prefix=None, cache=None):
        # ChatGLM's residual is the LayerNorm OUTPUT scaled by sqrt(2 L), not the block input.
        a = self.input_layernorm(x)
        h = a * self.alpha + self.attention(a, cos, sin, visible, prefix, cache)
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

    def prefix_kv(self, B: int):
        # (B, P, 2*L*H) -> (2L, B, n, P, d); layer l reads slot 2l as keys and 2l+1 as values.
        cfg = self.config
        kv = self.prefix_encoder(B)
        P = kv.shape[1]
        return kv.view(B, P, 2 * cfg.num_layers, cfg.num_attention_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = pad -> final hidden states (B, T, H)."""
        B, T = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        use_prefix = self.prefix_encoder is not None and (cache is None or cache.length == 0)
        prefix = self.prefix_kv(B) if use_prefix else None  # with a cache, written once at prefill
        P = 0 if self.prefix_encoder is None else self.prefix_encoder.pre_seq_len
        start = 0 if cache is None else max(cache.length - P, 0)  # token slot of input_ids[:, 0]

        if cache is None or cache.spans is None:
            spans = prompt_spans(input_ids, attention_mask, self.config)
            if cache is not None:
                cache.spans = spans
        else:
            spans = cache.spans
        slots = torch.arange(start, start + T, device=dev)  # (T,)
        # inv_freq is recomputed (not a buffer) so that model.to(bfloat16) can never round it.
        cos, sin = rotary_cos_sin(*positions_2d(slots, *spans), rotary_inv_freq(self.config.head_dim, dev))

        # Key j is visible to query i when it is a real token (or a prefix slot) and either lies in
        # the bidirectional prompt (j < c) or is not in the future (j <= i). Prefix slots have j < 0.
        key_valid = attention_mask.bool()
        if use_prefix and P:
            key_valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=dev), key_valid], dim=1)
        if cache is not None:
            cache.valid[:, cache.length:cache.length + key_valid.shape[1]] = key_valid
            key_valid = cache.valid[:, :cache.length + key_valid.shape[1]]
        key_slots = torch.arange(key_valid.shape[1], device=dev) - P  # (S,)
        c = spans[1]
        visible = key_valid[:, None, :] & ((key_slots[None, None, :] < c[:, None, None])
                                           | (key_slots[None, None, :] <= slots[None, :, None]))  # (B, T, S)

        x = self.word_embeddings(input_ids)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            layer_prefix = None if prefix is None else (prefix[2 * i], prefix[2 * i + 1])
            x = layer(x, cos, sin, visible, layer_prefix, cache)
        if cache is not None:
            cache.length += (P if use_prefix else 0) + T
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

