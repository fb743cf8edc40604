"""ChatGLM-6B: the network, its training loss, its checkpoint loader and writer, its tokenizer, batched generation."""
from .chatglm import PRESETS, ChatGLMConfig, ChatGLMModel, KVCache
from .generate import generate, generate_ids
from .loader import load_config, load_model, save_checkpoint
from .loss import linear_cross_entropy, token_loss_sum
from .tokenizer import ChatGLMTokenizer, load_tokenizer

__all__ = ["PRESETS", "ChatGLMConfig", "ChatGLMModel", "KVCache", "generate", "generate_ids", "linear_cross_entropy",
           "load_config", "load_model", "save_checkpoint", "token_loss_sum", "ChatGLMTokenizer", "load_tokenizer"]
