"""Training-step benchmark: random weights, random token batches, train.py's own step (forward_backward and
optimizer_step with its default optimisation settings).

    python bench/train.py --hidden 1024 --num-layers 4 --method lora --target qkv --layers 3 \\
        --batch-size 8 --seq-len 256 --precision fp32            # CPU: a small model with the released vocabulary
    python bench/train.py --model chatglm-6b --method lora --batch-size 8 --seq-len 512   # one GPU
    python bench/train.py --model chatglm-6b --method lora --quantize int4 --batch-size 8 --seq-len 512  # int4 base

Prints tokens/s, step time, peak memory and (on CUDA) the model FLOP utilisation. Every batch is a
training sample of the study's shape: a prompt of seq_len/2 tokens, [gMASK] <sop>, an answer, <eop>;
the loss covers the answer only, as in training.

FLOPs counted per optimizer step (matmuls only: 2 FLOPs per multiply-add; norms, rotary, softmax ignored):
    H hidden, F inner, L layers, V vocab, T tokens per sequence, S = T + prefix keys per query,
    tokens = batch * T, n = positions whose logits are computed (the answer tokens)
    forward   = tokens * L * (2 * (4 H^2 + 2 H F) + 4 H S)     per layer: qkv 3H^2, dense H^2, mlp 2HF; QK^T and AV
              + n * 2 H V                                       lm_head, at the answer positions only
              + tokens * 2 * adapter matmul params              LoRA A and B (P-Tuning: none)
    backward  = tokens * (L - l0) * (2 * (4 H^2 + 2 H F) + 8 H S)   input gradients above the lowest trainable
                                                                  layer l0 (attention backward: 4 matmuls)
              + n * 2 H V                                       lm_head input gradient
              + tokens * 2 * trainable matmul params            weight gradients (x n instead of tokens for lm_head)
    MFU = (forward + backward) / step time / peak bf16 dense FLOP/s of the GPU (--peak-tflops).
Below l0 there is no backward at all (nothing there requires grad), which is why Freeze/LoRA on the last
layers cost little more than inference.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402  (the training loop's step and set-up)
from adapters import AdapterSpec, add_adapter_args, apply_adapter, float32_trainable  # noqa: E402
from model.chatglm import ATTENTION_KERNELS, ChatGLMModel  # noqa: E402
from model.config import PRESETS, ChatGLMConfig  # noqa: E402
from model.loader import load_config  # noqa: E402
from model.loss import IGNORE, n_targets  # noqa: E402
from model.quant import MODES as QUANT_MODES, quantize_model  # noqa: E402
from runtime.files import write_json  # noqa: E402
from runtime.flags import POSITIVE  # noqa: E402
from runtime.precision import DTYPES, add_precision_arg, precision  # noqa: E402
from runtime.process import peak_memory_bytes  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"a preset ({', '.join(sorted(PRESETS))}) or a model directory (its config; random "
                        "weights); default: the custom config of --hidden etc. with the released vocabulary")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--inner", type=int, default=None, help="MLP width (default 4 x hidden)")
    p.add_argument("--vocab", type=int, default=130528)
    add_adapter_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    add_precision_arg(p, "train.py --precision")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--quantize", choices=QUANT_MODES, default="none", help="train.py --quantize: the frozen base")
    p.add_argument("--compile", action="store_true", help="train.py --compile: torch.compile each block")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa",
                   help="attention kernel (FlexAttention trains on a GPU only)")
    p.add_argument("--peak-tflops", type=POSITIVE, default=None, help="GPU peak bf16 dense TFLOP/s (default: by name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return p.parse_args(argv)


def model_config(args) -> ChatGLMConfig:
    if args.model:
        return load_config(args.model)
    base = ChatGLMConfig()  # the released special-token ids go with the released vocabulary
    return ChatGLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.num_layers,
                         num_attention_heads=args.heads, inner_hidden_size=args.inner or 4 * args.hidden,
                         max_sequence_length=max(2048, args.seq_len + 16), mask_token_id=base.mask_token_id,
                         gmask_token_id=base.gmask_token_id, bos_token_id=base.bos_token_id,
                         eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id)


def random_batch(config: ChatGLMConfig, batch: int, T: int, g: torch.Generator) -> dict:
    """Prompt (T/2 - 2 random ids) [gMASK] <sop> answer (random ids) <eop>: (B, T), labels from <sop> on."""
    src = T // 2 - 2
    low = max(config.pad_token_id, config.mask_token_id, config.gmask_token_id, config.bos_token_id,
              config.eos_token_id) + 1  # no special id inside, wherever the vocabulary puts them
    ids = torch.randint(low, config.vocab_size, (batch, T), generator=g)
    ids[:, src], ids[:, src + 1], ids[:, -1] = config.gmask_token_id, config.bos_token_id, config.eos_token_id
    labels = ids.clone()
    labels[:, :src + 1] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_flops(model, config: ChatGLMConfig, batch: int, T: int, lowest: int) -> float:
    H, F, L, V = config.hidden_size, config.inner_hidden_size, config.num_layers, config.vocab_size
    prefix = model.transformer.prefix_encoder.pre_seq_len if model.transformer.prefix_encoder is not None else 0
    S, tokens, n = T + prefix, batch * T, batch * (T - (T // 2 - 1))  # answer positions incl. the one after <sop>
    base_matmul = 2 * (4 * H * H + 2 * H * F)
    adapter_matmul = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    trainable_matmul = sum(p.numel() for name, p in model.named_parameters()
                           if p.requires_grad and p.ndim == 2 and "word_embeddings" not in name
                           and "prefix_encoder" not in name and name != "lm_head.weight")
    lm_head_trainable = model.lm_head.weight.requires_grad
    forward = tokens * L * (base_matmul + 4 * H * S) + n * 2 * H * V + tokens * 2 * adapter_matmul
    backward = (tokens * (L - lowest) * (base_matmul + 8 * H * S) + n * 2 * H * V
                + tokens * 2 * trainable_matmul + (n * 2 * H * V if lm_head_trainable else 0))
    return float(forward + backward)


def step(trainer, micro, max_grad_norm: float):
    """One optimizer step of train.py's loop."""
    train.forward_backward(trainer, micro)
    train.optimizer_step(trainer, max_grad_norm)


def setup(args, device):
    """Random weights, the adapter, and train.py's own optimizer set-up -> (model, spec, lowest, trainer, micro,
    max_grad_norm)."""
    config = model_config(args)
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = ChatGLMModel(config)
    model = model.to(DTYPES[args.precision]).to_empty(device=device).init_weights(args.seed)
    model.transformer.attention = args.attention
    spec = AdapterSpec.from_args(args, config.num_layers)
    float32_trainable(apply_adapter(model, spec))
    quantize_model(model, args.quantize)  # the frozen Linears of the blocks, in place (as train.py)
    model.train()
    lowest = train.prepare_blocks(model, args.grad_checkpointing, args.compile)
    optim = train.Optimization()  # train.py's optimisation settings at their defaults (the study's)
    run = train.Execution(precision=args.precision, attention=args.attention, compile=args.compile,
                          grad_checkpointing=args.grad_checkpointing, quantize=args.quantize)
    trainer = train.make_trainer(model, optim, run, args.warmup + args.steps, rank=0, world=1, device=device)
    batch = random_batch(config, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
    micro = [(batch, 1 / n_targets(batch["labels"]))]  # the loss: mean over label tokens
    return model, spec, lowest, trainer, micro, optim.max_grad_norm


def timed_steps(s, micro, max_grad_norm: float, warmup: int, steps: int, device) -> list[float]:
    """Seconds of each of `steps` optimizer steps after `warmup` untimed ones; peak memory counts the timed ones."""
    for _ in range(warmup):
        step(s, micro, max_grad_norm)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(s, micro, max_grad_norm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    args.precision = precision(args.precision, device.type)
    model, spec, lowest, s, micro, max_grad_norm = setup(args, device)
    times = timed_steps(s, micro, max_grad_norm, args.warmup, args.steps, device)
    config, mean = model.config, statistics.mean(times)
    tokens = args.batch_size * args.seq_len
    flops = step_flops(model, config, args.batch_size, args.seq_len, lowest)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    record = {"device": name, "spec": spec.to_dict(), "attention": args.attention, "precision": args.precision,
              "quantize": args.quantize,
              "batch": args.batch_size, "seq_len": args.seq_len, "step_ms": mean * 1e3, "min_step_ms": min(times) * 1e3,
              "tokens_per_s": tokens / mean, "peak_gib": peak_memory_bytes(device) / 2**30,
              "gflop_per_step": flops / 1e9,
              "mfu": flops / mean / (peak * 1e12) if device.type == "cuda" and peak else None}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: hidden {config.hidden_size}, {config.num_layers} layers, {config.num_attention_heads} heads, "
          f"inner {config.inner_hidden_size}, vocab {config.vocab_size} ({n_params / 1e6:.1f}M params); "
          f"{spec.to_dict()}; lowest trainable layer {lowest}; attention {args.attention}")
    print(f"device: {name} ({torch.get_num_threads()} threads), {args.precision}, batch {args.batch_size} x "
          f"{args.seq_len} tokens{', grad checkpointing' if args.grad_checkpointing else ''}"
          f"{f', base {args.quantize}' if args.quantize != 'none' else ''}"
          f"{', compiled' if args.compile else ''}")
    print(f"step time: {mean * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, {args.steps} steps after {args.warmup} warmup)")
    print(f"tokens/s: {tokens / mean:.0f}")
    print(f"peak memory: {record['peak_gib']:.2f} GiB "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'process max RSS, VmHWM'})")
    print(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP -> {flops / mean / 1e9:.1f} GFLOP/s")
    if device.type == "cuda":
        print(f"MFU: {100 * record['mfu']:.1f}% of {peak:.0f} TFLOP/s" if peak else
              f"MFU: unknown peak for {name}; pass --peak-tflops")
    if args.json:
        write_json(args.json, record)


if __name__ == "__main__":
    main()
