"""ChatGLM-6B: the network, its training loss, its checkpoint loader and writer, its tokenizer, batched generation."""
from .chatglm import ATTENTION_KERNELS, PRESETS, ChatGLMConfig, ChatGLMModel, KVCache
from .generate import compiled_decode_step, decode_step, generate, generate_ids, left_pad, prefill, sample_seed
from .loader import load_config, load_model, save_checkpoint
from .loss import linear_cross_entropy, token_loss_sum
from .tokenizer import ChatGLMTokenizer, load_tokenizer

__all__ = ["ATTENTION_KERNELS", "PRESETS", "ChatGLMConfig", "ChatGLMModel", "KVCache", "ChatGLMTokenizer",
           "compiled_decode_step", "decode_step", "generate", "generate_ids", "left_pad", "linear_cross_entropy",
           "load_config", "load_model", "load_tokenizer", "prefill", "sample_seed", "save_checkpoint", "token_loss_sum"]
