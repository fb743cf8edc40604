"""Generation speed: prefill and decode tokens/s and peak memory, or cached-batched vs naive generation.

    python bench/generate.py --model tiny --batch-size 32 --prompt-len 128 --new-tokens 64
    python bench/generate.py --model chatglm-6b --device cuda --precision bf16 --batch-size 32   # random weights
    python bench/generate.py --model proxy-28 --batch-size 1 8 32 --compile   # eager vs compiled decoding
    python bench/generate.py --model chatglm-6b --batch-size 8 --attention flex --profile   # which kernels ran
    python bench/generate.py --model proxy-28 --batch-size 1 8 --quantize int4   # quantized frozen weights
    python bench/generate.py --model chatglm-6b --layers 4 --batch-size 1 --quantize int8 --compile  # 6B's layers
    python bench/generate.py --compare    # CPU: 64 prompts batched with a KV cache vs one at a time without one

Weights are random (a preset) unless --model names a model directory; the speed does not depend on them.
Prompts are random ids ending [gMASK] <sop>; decoding is greedy and runs every step (no early stop on <eop>),
so each measurement covers exactly batch x new-tokens generated tokens.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.chatglm import ATTENTION_KERNELS, ChatGLMModel  # noqa: E402
from model.generate import compiled_decode_step, decode_step, generate_ids, prefill  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.loader import load_config, load_model  # noqa: E402
from model.quant import MODES as QUANT_MODES, quantize_model, tensor_bytes  # noqa: E402
from runtime.files import write_json  # noqa: E402
from runtime.flags import COUNT  # noqa: E402
from runtime.precision import DTYPES, add_precision_arg, precision  # noqa: E402
from runtime.process import peak_memory_bytes  # noqa: E402


def random_prompts(config, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    low = max(config.pad_token_id, config.mask_token_id, config.gmask_token_id, config.eos_token_id,
              config.bos_token_id) + 1
    body = torch.randint(low, config.vocab_size, (n, length - 2), generator=g)  # no special ids inside
    return [row + [config.gmask_token_id, config.bos_token_id] for row in body.tolist()]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> str:
    where = "GPU memory" if device.type == "cuda" else "process RSS"
    return f"peak {where} {peak_memory_bytes(device) / 2**30:.2f} GiB"


@torch.no_grad()
def prefill_decode(model, prompts: list[list[int]], new_tokens: int, device, step) -> tuple[float, float, list]:
    """Seconds for the prefill of the batch and for `new_tokens` greedy decode steps by `step`; the tokens."""
    ids = torch.tensor(prompts, device=device)  # (B, T), equal lengths: no padding
    B, T = ids.shape
    cache = model.new_cache(B, T + new_tokens)
    sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)  # (B, V)
    sync(device)
    t1 = time.perf_counter()
    out = []
    for _ in range(new_tokens):
        out.append(logits.argmax(-1))  # (B,)
        logits = step(model, out[-1][:, None], cache)  # (B, V)
    sync(device)
    return t1 - t0, time.perf_counter() - t1, torch.stack(out, 1).tolist()


def print_kernels(model, prompts: list[list[int]], new_tokens: int, device, step):
    """The most expensive operators and kernels of one generation (which attention kernel ran: on CUDA, SDPA's
    flash / memory-efficient / cuDNN kernel or FlexAttention's Triton template)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        prefill_decode(model, prompts, new_tokens, device, step)
    order = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=order, row_limit=15, max_name_column_width=90))


@torch.no_grad()
def naive_generate(model, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
    """One prompt, no cache: the whole sequence goes through the model again for every new token."""
    ids = list(prompt)
    out = []
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]))[0, -1]  # (V,) from a (1, T + k, V) forward
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eos:
            break
        ids.append(nxt)
    return out


def weight_bytes_per_step(model) -> int:
    """Bytes every decode step must read: each weight once; the embedding table only as the output matrix
    (a lookup reads B rows), so an untied embedding does not count."""
    total = tensor_bytes(model)  # parameters and buffers (quantized weights)
    emb, out = model.transformer.word_embeddings.weight, model.lm_head.weight
    return total - (0 if emb is out else emb.numel() * emb.element_size())


def bench_model(name: str, layers: int | None, dtype: torch.dtype, device) -> ChatGLMModel:
    """load_model(name), or with `layers` a preset's shape at that depth (random weights): ChatGLM-6B's layers on
    a machine that cannot hold 28 of them."""
    if layers is None:
        return load_model(name, dtype=dtype, device=device)
    with torch.device("meta"):
        model = ChatGLMModel(replace(load_config(name), num_layers=layers))
    return model.to(dtype).to_empty(device=device).init_weights(0).eval()


def speed(args):
    device = torch.device(args.device)
    # Quantizing a model directory: loaded on the CPU, quantized layer by layer onto the device (as train.py and
    # evaluate.py do). A preset's random weights start on the device (the CPU would take ~35 s to draw the 6B's);
    # the peak memory is measured after the float weights are gone.
    on_device = args.quantize == "none" or str(args.model) in PRESETS
    model = bench_model(args.model, args.layers, DTYPES[args.precision], device if on_device else "cpu")
    quantize_model(model.requires_grad_(False), args.quantize, device)
    model = model.to(device).eval()
    model.transformer.attention = args.attention
    steps = {"eager": decode_step}
    if args.compile:
        steps["compiled"] = compiled_decode_step(device.type)
    T, N = args.prompt_len, args.new_tokens
    where = f"{device}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    shown = args.model if args.layers is None else f"{args.model} with {args.layers} layers"
    print(f"model {shown} ({args.precision}, quantize {args.quantize}, {where}, {args.attention}) prompt {T}, "
          f"new tokens {N}; parameters + buffers {tensor_bytes(model) / 2**20:,.1f} MiB")
    record = {"model": args.model, "layers": model.config.num_layers, "precision": args.precision,
              "quantize": args.quantize, "attention": args.attention,
              "prompt_len": T, "new_tokens": N, "tensor_bytes": tensor_bytes(model),
              "weight_bytes_per_step": weight_bytes_per_step(model), "runs": []}
    for B in args.batch_size:
        prompts = random_prompts(model.config, B, T)
        tokens = {}
        for name, step in steps.items():
            for _ in range(2 if name == "compiled" else 1):  # warm-up: compilation, CUDA graph recording
                prefill_decode(model, prompts, N, device, step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefill_s, decode_s, tokens[name] = prefill_decode(model, prompts, N, device, step)
            print(f"batch {B:3d} {name:8s} prefill {B * T / prefill_s:10,.0f} tokens/s ({prefill_s * 1000:.1f} ms); "
                  f"decode {B * N / decode_s:9,.0f} tokens/s ({decode_s / N * 1000:.2f} ms per step); "
                  f"{peak_memory(device)}")
            record["runs"].append({"batch": B, "mode": name, "prefill_tokens_per_s": B * T / prefill_s,
                                   "decode_tokens_per_s": B * N / decode_s, "decode_step_ms": decode_s / N * 1000,
                                   "peak_gib": peak_memory_bytes(device) / 2**30})
            if args.profile:
                print_kernels(model, prompts, N, device, step)
        if args.compile:
            same = tokens["compiled"] == tokens["eager"]
            print(f"batch {B:3d} compiled greedy tokens identical to eager: {same}")
            record["runs"][-1]["tokens_identical_to_eager"] = same
        if args.json:  # rewritten after every batch size: what finished survives a time limit
            write_json(args.json, record)


def compare(args):
    """Batched generation with the KV cache (model.generate.generate_ids) vs the naive loop, same answers."""
    torch.manual_seed(0)
    model = load_model(args.model, dtype=torch.float32, device="cpu").eval()
    cfg = model.config
    prompts = random_prompts(cfg, 64, args.prompt_len)
    t0 = time.perf_counter()
    batched = generate_ids(model, prompts, max_new_tokens=args.new_tokens)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = [naive_generate(model, p, args.new_tokens, cfg.eos_token_id) for p in prompts]
    naive_s = time.perf_counter() - t0
    tokens = sum(len(r) for r in batched)
    print(f"model {args.model} (fp32, cpu, {torch.get_num_threads()} threads), 64 prompts of {args.prompt_len} "
          f"tokens, up to {args.new_tokens} new tokens each ({tokens} generated)")
    print(f"batched, KV cache:          {batched_s:8.2f} s  ({tokens / batched_s:,.0f} tokens/s)")
    print(f"one at a time, no cache:    {naive_s:8.2f} s  ({tokens / naive_s:,.0f} tokens/s)")
    print(f"speedup: {naive_s / batched_s:.1f}x; identical greedy answers: {batched == naive}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="preset (tiny, proxy-28, chatglm-6b: random weights) or checkpoint dir")
    p.add_argument("--layers", type=COUNT, default=None, help="a preset at this depth (default: the preset's own)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batch sizes")
    p.add_argument("--prompt-len", type=int, help="prompt tokens incl. [gMASK] <sop> (default 128; --compare 64)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 64; --compare 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_arg(p, "the weights and compute")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa", help="attention kernel")
    p.add_argument("--quantize", choices=QUANT_MODES, default="none",
                   help="the blocks' Linear weights int8 / int4 (model/quant.py), dequantized at each matmul")
    p.add_argument("--compile", action="store_true",
                   help="also time the compiled decode step (CUDA graphs on CUDA) and compare its tokens with eager")
    p.add_argument("--profile", action="store_true", help="print the top operators and kernels of each run")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    p.add_argument("--compare", action="store_true",
                   help="CPU, fp32: 64 prompts batched with the KV cache vs one at a time without a cache")
    args = p.parse_args()
    args.precision = precision(args.precision, torch.device(args.device).type)
    args.new_tokens = args.new_tokens or 64
    if args.compare:
        args.prompt_len = args.prompt_len or 64
        compare(args)
    else:
        args.prompt_len = args.prompt_len or 128
        speed(args)


if __name__ == "__main__":
    main()
