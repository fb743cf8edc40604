"""ChatGLM's sentencepiece tokenizer (`ice_text.model`) with the reference's text preprocessing.

Newlines, tabs and runs of 2..80 spaces are pieces of their own (`<n>`, `<|tab|>`, `<|blank_k|>`);
special tokens are pieces too and are looked up by piece, never hard-coded.
"""
import json
from pathlib import Path

import sentencepiece as spm

from runtime.files import InputError

from .config import PRESETS, ChatGLMConfig

MAX_BLANK = 80
SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
# The study's decode rule, measured with the reference tokenizer (tokenization_chatglm.py under transformers
# 4.30.2) on data/demo/ice_text.model: its `all_special_ids` are exactly these (its bos, eos, unk, pad and mask
# tokens), so `batch_decode(..., skip_special_tokens=True)` drops exactly these; [gMASK], [sMASK], <unused_0>,
# <ENC> and <dBLOCK> stay as their text.
SKIPPED_PIECES = ["<sop>", "<eop>", "<unk>", "<pad>", "[MASK]"]
DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "demo" / "ice_text.model"


def preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for k in range(MAX_BLANK, 1, -1):  # longest runs first
        text = text.replace(" " * k, f"<|blank_{k}|>")
    return text


def postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for k in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{k}|>", " " * k)
    return text


class ChatGLMTokenizer:
    def __init__(self, model_file):
        self.model_file = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except Exception as e:  # sentencepiece says RuntimeError or OSError, without the file
            raise InputError(f"{self.model_file}: not a sentencepiece model ({str(e).splitlines()[0][:120]}); copy "
                             "ice_text.model from the released model again") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = {}
        for piece in SPECIAL_PIECES + ["<pad>", "<unk>"]:
            i = self.sp.piece_to_id(piece)
            if self.sp.id_to_piece(i) != piece:
                raise InputError(f"{self.model_file}: piece {piece!r} is missing; this is not a ChatGLM tokenizer")
            ids[piece] = i
        self.special_ids = ids
        self.mask_id, self.gmask_id = ids["[MASK]"], ids["[gMASK]"]
        self.sop_id, self.eop_id = ids["<sop>"], ids["<eop>"]
        self.pad_id, self.unk_id = ids["<pad>"], ids["<unk>"]
        self.skipped_ids = {ids[piece] for piece in SKIPPED_PIECES}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; with special tokens the ids end with [gMASK] <sop>, as the reference builds a prompt."""
        ids = self.sp.encode(preprocess(text))
        return ids + [self.gmask_id, self.sop_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text; decode(encode(t, False)) == t. Pads always decode to nothing, and so do ids past the
        tokenizer's pieces (the model's vocabulary may be padded: 130528 vs 130344 in the release).
        skip_special_tokens=True is the study's rule (SKIPPED_PIECES): it also drops <sop>, <eop>, <unk>
        and [MASK]; the other special pieces stay as their text, e.g. '你好[gMASK] 你好'.
        Without it <unk> decodes as ' ⁇ '."""
        drop = self.skipped_ids if skip_special_tokens else {self.pad_id}
        return postprocess(self.sp.decode([int(i) for i in ids if int(i) not in drop and int(i) < self.vocab_size]))

    def check_config(self, config, where: str):
        """Special-token ids must agree with the model config, or generation never sees <eop>."""
        pairs = [("bos_token_id", "<sop>"), ("eos_token_id", "<eop>"), ("mask_token_id", "[MASK]"),
                 ("gmask_token_id", "[gMASK]"), ("pad_token_id", "<pad>")]
        for field, piece in pairs:
            if getattr(config, field) != self.special_ids[piece]:
                raise InputError(f"{where}: config {field}={getattr(config, field)} but tokenizer {self.model_file} "
                                 f"has {piece} at id {self.special_ids[piece]}; use the tokenizer shipped with the "
                                 "model")
        if self.vocab_size > config.vocab_size:
            raise InputError(f"{where}: tokenizer {self.model_file} has {self.vocab_size} pieces but the model "
                             f"vocab_size is {config.vocab_size}")


def load_tokenizer(path_or_preset) -> ChatGLMTokenizer:
    """A model directory (its `ice_text.model`, checked against its config.json), a `.model` file,
    or a preset name ('tiny' -> the bundled demo tokenizer; 'chatglm-6b' needs a real directory)."""
    if str(path_or_preset) in PRESETS:
        if path_or_preset != "tiny":
            raise ValueError(f"preset {path_or_preset!r} has no bundled tokenizer; pass the model directory "
                             "that holds ice_text.model")
        tok = ChatGLMTokenizer(DEMO_TOKENIZER)
        tok.check_config(ChatGLMConfig.from_name("tiny"), "preset 'tiny'")
        return tok
    path = Path(path_or_preset)
    if path.is_file():
        return ChatGLMTokenizer(path)
    model_file = path / "ice_text.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: a ChatGLM model directory holds its tokenizer there")
    tok = ChatGLMTokenizer(model_file)
    if (path / "config.json").is_file():
        tok.check_config(ChatGLMConfig.from_json(path / "config.json"), str(path / "config.json"))
    return tok


def tokenizer_config_json() -> str:
    """The `tokenizer_config.json` written next to `ice_text.model` in model directories we save."""
    return json.dumps({"tokenizer_class": "ChatGLMTokenizer", "do_lower_case": False, "remove_space": False,
                       "num_image_tokens": 0, "max_blank_length": MAX_BLANK}, indent=2)
