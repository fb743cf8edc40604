"""ChatGLM-6B, one concern a module; import from the module (`from model.loader import load_model`):

    config.py      the shape and special-token ids: ChatGLMConfig, PRESETS (plain Python, no torch)
    chatglm.py     the network: 2D rotary, prefix-LM attention, the block, the static KV cache, the output layer
    loss.py        the training loss (output layer + cross-entropy fused by chunks) and its label conventions
    loader.py      a model directory or preset -> model, shard by shard; save_model writes the released layout
    tokenizer.py   ice_text.model with the reference's newline / tab / space preprocessing
    generate.py    left padding, prefill, a compilable decode step, greedy or top-p sampling
    quant.py       int8 / int4 frozen Linear weights
    memory.py      the memory one process holds at the peak of a training step (train.py --dry-run's estimate)

This file imports nothing, so that config.py reads without torch (launch.sh --dry-run).
"""
