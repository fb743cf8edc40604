"""The model's shape and special-token ids: the dataclass, read from a model directory's config.json or a named preset.

Plain Python, no torch: launch.sh's dry run names the runs of the demo's grid by the tiny preset's depth on a
machine without PyTorch.
"""
import json
from dataclasses import asdict, dataclass, fields


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
            raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}, or a model directory")
        return cls(**PRESETS[name])

    @classmethod
    def from_json(cls, path) -> "ChatGLMConfig":
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        known = {f.name for f in fields(cls)}
        if not raw.get("position_encoding_2d", True):
            raise ValueError(f"{path}: position_encoding_2d=false is not ChatGLM-6B; only the 2D rotary model is "
                             "implemented")
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
    # ChatGLM-6B's depth, vocabulary and head size at a width a CPU runs: benchmarks of per-layer and
    # per-step overheads (kernel launches, Python) that a narrow 6-layer model would hide.
    "proxy-28": dict(hidden_size=256, num_attention_heads=2, inner_hidden_size=1024),
}
