"""The model's shape and special-token ids: the dataclass, read from a model directory's config.json or a named preset.

Plain Python, no torch: launch.sh's dry run names the runs of the demo's grid by the tiny preset's depth on a
machine without PyTorch.
"""
from dataclasses import asdict, dataclass, fields

from runtime.files import InputError, load_json

# The range of each size config.json may give: far past ChatGLM-6B's, low enough that a typo cannot ask for
# terabytes. Token ids lie in [0, vocab_size); pre_seq_len in [1, max_sequence_length].
RANGES = {"vocab_size": (1, 1 << 20), "hidden_size": (4, 1 << 16), "num_layers": (1, 1024),
          "num_attention_heads": (1, 1024), "inner_hidden_size": (1, 1 << 18), "max_sequence_length": (1, 1 << 20),
          "layernorm_epsilon": (1e-12, 1e-2)}
OPTIONAL = ("pre_seq_len", "prefix_projection", "tie_word_embeddings")  # the only keys config.json may leave out
TOKEN_IDS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")


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
        """A model directory's config.json, every field it sets checked for its type and range (`problems`)."""
        fix = "fix it, or copy config.json from the released model again"
        raw = load_json(path, fix)
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object of the model's settings, got {type(raw).__name__}; {fix}")
        if raw.get("position_encoding_2d", True) is not True:
            raise InputError(f"{path}: position_encoding_2d={raw['position_encoding_2d']!r} is not ChatGLM-6B; only "
                             "the 2D rotary model is implemented")
        kinds = {f.name: f.type for f in fields(cls)}
        missing = [k for k in kinds if k not in raw and k not in OPTIONAL]
        if missing:  # a typo would otherwise load ChatGLM-6B's value (the released config.json has every one)
            raise InputError(f"{path}: lacks {', '.join(missing)}; {fix}")
        wrong = [f"{k} is {v!r}, expected {getattr(kinds[k], '__name__', kinds[k])}" for k, v in raw.items()
                 if k in kinds and not type_ok(v, kinds[k])]
        problems = wrong or cls(**{k: v for k, v in raw.items() if k in kinds}).problems()
        if problems:
            raise InputError(f"{path}: {'; '.join(problems)}; {fix}")
        return cls(**{k: v for k, v in raw.items() if k in kinds})

    def problems(self) -> list[str]:
        """What no ChatGLM model can have: sizes out of RANGES, heads that do not split the width into halves of
        even size (2D rotary), token ids outside the vocabulary."""
        out = [f"{k} is {getattr(self, k)}, expected {lo} to {hi}" for k, (lo, hi) in RANGES.items()
               if not lo <= getattr(self, k) <= hi]
        if not out and (self.hidden_size % self.num_attention_heads or self.head_dim % 4):
            out.append(f"hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} is not a "
                       "whole multiple of 4 (each head's two rotary halves rotate pairs)")
        out += [f"{k} is {getattr(self, k)}, outside the vocabulary (0 to {self.vocab_size - 1})" for k in TOKEN_IDS
                if not 0 <= getattr(self, k) < self.vocab_size]
        if self.pre_seq_len is not None and not 1 <= self.pre_seq_len <= self.max_sequence_length:
            out.append(f"pre_seq_len is {self.pre_seq_len}, expected 1 to max_sequence_length "
                       f"{self.max_sequence_length}")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "position_encoding_2d": True, "model_type": "chatglm"}


def type_ok(value, kind) -> bool:
    """JSON `value` fits a field annotated `kind` (int, float, bool or int | None); true and false are not numbers."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, int) or (value is None and kind is not int)


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
