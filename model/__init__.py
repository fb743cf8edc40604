"""ChatGLM-6B: the network, its checkpoint loader and writer, its tokenizer, batched generation."""
from .chatglm import PRESETS, ChatGLMConfig, ChatGLMModel, KVCache
from .generate import generate, generate_ids
from .loader import load_config, load_model, save_checkpoint
from .tokenizer import ChatGLMTokenizer, load_tokenizer

__all__ = ["PRESETS", "ChatGLMConfig", "ChatGLMModel", "KVCache", "generate", "generate_ids", "load_config", "load_model",
           "save_checkpoint", "ChatGLMTokenizer", "load_tokenizer"]
