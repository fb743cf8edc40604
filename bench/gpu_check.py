"""The one-call GPU check: ChatGLM-6B-shaped random bf16 weights on one GPU, within --budget (7 minutes).

    python bench/gpu_check.py --out gpu_check          # -> gpu_check/gpu_check.json and gpu_check/gpu_check.md

What it measures, most wanted first; each measurement is a subprocess with its own time limit, so a failure
costs one row, and what no longer fits the budget is reported as skipped:
- training steps at batch 8 x 512 (`bench/train.py`): LoRA r8 on QKV of the last 3 layers, Freeze MLP of the last
  3 layers, P-Tuning v2 (16 prefix tokens); each with SDPA and with FlexAttention; fused AdamW; tokens/s, MFU
  (the FLOP count in bench/train.py), peak memory;
- prefill and decode tokens/s at batch 1, 8 and 32, prompt 128, 64 new tokens (`bench/generate.py`), eager and
  compiled, with decode at batch 1 against the memory-bandwidth bound (weights read once per step, at the copy
  bandwidth measured here);
- quantized frozen weights (model/quant.py): compiled decode at batch 1 with int8 and int4 blocks against bf16's,
  and LoRA on QKV of the last 3 layers trained over an int4 base at batch 8 x 512 (peak memory);
- which attention kernels ran: the CUDA kernel names of one forward of a 2-layer model of the 6B's width, per
  `--attention` choice (the profiler's names: flash, memory-efficient/cutlass, flex/triton, or plain matmuls).
Paste the markdown into BENCHMARKS.md with the date and the device.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.chatglm import ATTENTION_KERNELS, ChatGLMModel  # noqa: E402
from model.config import ChatGLMConfig  # noqa: E402
from runtime.files import write_json  # noqa: E402
from runtime.flags import POSITIVE  # noqa: E402

TRAIN_CASES = {  # name -> bench/train.py method flags
    "LoRA QKV last 3": ["--method", "lora", "--target", "qkv", "--layers", "3"],
    "Freeze MLP last 3": ["--method", "freeze", "--target", "mlp", "--layers", "3"],
    "P-Tuning v2 (16)": ["--method", "ptuning", "--pre-seq-len", "16"],
}
BATCHES = ("1", "8", "32")
QUANT_MODES = ("int8", "int4")


def run_bench(script: str, argv: list[str], timeout: float) -> dict:
    """One benchmark process -> its JSON record, or {"error": ...} with the last line it printed."""
    if timeout < 20:
        return {"error": "skipped: the check's time budget is spent"}
    with tempfile.TemporaryDirectory() as tmp:
        return bench_process(script, argv, Path(tmp) / "record.json", timeout)


def bench_process(script: str, argv: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / script), *argv, "--json", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        print(p.stdout[-2000:], p.stderr[-2000:] if p.returncode else "", sep="", flush=True)
        last = ((p.stderr or p.stdout).strip().splitlines() or [""])[-1]
        error = None if p.returncode == 0 else f"exit {p.returncode}: {last}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    record = json.loads(out.read_text()) if out.is_file() else {}  # generate.py writes after each batch size
    if error:
        record["error"] = error
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (the practical bandwidth bound)."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 10 * 2 * a.numel() * a.element_size() / (time.perf_counter() - t0)


def attention_kernels(attention: str) -> list[str]:
    """CUDA kernel names of one bf16 forward of a 2-layer model of the 6B's width (prompt 256 + answer 256)."""
    config = ChatGLMConfig(num_layers=2)
    with torch.device("meta"):
        model = ChatGLMModel(config)
    model = model.to(torch.bfloat16).to_empty(device="cuda").init_weights(0)
    model.transformer.attention = attention
    ids = torch.randint(10, 20000, (8, 512), device="cuda")
    ids[:, 254], ids[:, 255] = config.gmask_token_id, config.bos_token_id
    with torch.no_grad():
        model(ids)  # warm-up (compiles FlexAttention)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(ids)
            torch.cuda.synchronize()
    words = ("flash", "fmha", "efficient", "cutlass", "attention", "flex", "triton", "softmax", "cudnn")
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)})[:8]


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}, PyTorch {result['torch']}, {result['date']}; copy bandwidth "
             f"{result['bandwidth_tb_s']:.2f} TB/s (read + write); the check took {result['wall_s']:.0f} s.", "",
             "| training, batch 8 x 512 | attention | step time | tokens/s | MFU | peak memory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rows in result["train"].items():
        for att, r in rows.items():
            lines.append(f"| {name} | {att} | failed: {r['error']} | | | |" if "error" in r else
                         f"| {name} | {att} | {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                         f"{r['peak_gib']:.2f} GiB |")
    gen = result["generate"]
    lines += ["", f"Generation, prompt 128, 64 new tokens, greedy; the bandwidth bound of a decode step is "
                  f"{gen.get('weight_bytes_per_step', 0) / 1e9:.2f} GB of weights at the copy bandwidth.", "",
              "| decode step | batch | prefill tokens/s | decode tokens/s | ms per step | % of bandwidth bound | "
              "peak memory |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in gen.get("runs", []):
        same = {True: " (tokens = eager)", False: " (TOKENS DIFFER)"}.get(r.get("tokens_identical_to_eager"), "")
        lines.append(f"| {r['mode']}{same} | {r['batch']} | {r['prefill_tokens_per_s']:,.0f} | "
                     f"{r['decode_tokens_per_s']:,.0f} | {r['decode_step_ms']:.2f} | {r['bound_fraction']:.0%} | "
                     f"{r['peak_gib']:.2f} GiB |")
    if "error" in gen:
        lines.append(f"| generation stopped: {gen['error']} | | | | | | |")
    bf16 = next((r["decode_tokens_per_s"] for r in gen.get("runs", []) if r["batch"] == 1 and r["mode"] == "compiled"),
                None)
    lines += ["", "| quantized blocks, compiled decode, batch 1 | decode tokens/s | x bf16 compiled | ms per step | "
                  "% of its bandwidth bound | peak memory |", "| --- | --- | --- | --- | --- | --- |"]
    for mode, q in result["quantized"].items():
        r = next((r for r in q.get("runs", []) if r["mode"] == "compiled"), None)
        if r is None:
            lines.append(f"| {mode} | failed: {q.get('error', 'no compiled run')} | | | | |")
            continue
        same = {True: " (tokens = eager)", False: " (TOKENS DIFFER)"}.get(r.get("tokens_identical_to_eager"), "")
        ratio = f"{r['decode_tokens_per_s'] / bf16:.2f}x" if bf16 else "no bf16 row"
        bound_s = q["weight_bytes_per_step"] / (result["bandwidth_tb_s"] * 1e12)  # its int8 / int4 bytes
        lines.append(f"| {mode}{same} | {r['decode_tokens_per_s']:,.0f} | {ratio} | {r['decode_step_ms']:.2f} | "
                     f"{bound_s / (r['decode_step_ms'] / 1e3):.0%} | {r['peak_gib']:.2f} GiB |")
    r = result["int4_training"]
    lines += ["", "LoRA QKV last 3 over an int4 base, batch 8 x 512: " +
              (f"failed: {r['error']}" if "error" in r else f"{r['step_ms']:.1f} ms per step, "
               f"{r['tokens_per_s']:,.0f} tokens/s, peak memory {r['peak_gib']:.2f} GiB")]
    lines += ["", "| attention | CUDA kernels of the attention (2-layer model, 6B width, batch 8 x 512) |",
              "| --- | --- |"]
    lines += [f"| {att} | {', '.join(f'`{k[:70]}`' for k in ks) if isinstance(ks, list) else ks} |"
              for att, ks in result["kernels"].items()]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--budget", type=POSITIVE, default=420, help="seconds; measurements that no longer fit are skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU")
    t0 = time.perf_counter()
    left = lambda cap: min(cap, args.budget - (time.perf_counter() - t0))  # noqa: E731
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "bandwidth_tb_s": copy_bandwidth() / 1e12,
              "train": {name: {} for name in TRAIN_CASES}, "generate": {}, "quantized": {}, "int4_training": {},
              "kernels": {}}
    for att in ATTENTION_KERNELS:
        try:
            result["kernels"][att] = attention_kernels(att)
        except Exception as e:  # a kernel that does not run here is a finding, not the end of the check
            result["kernels"][att] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    torch.cuda.empty_cache()
    # Most wanted first: SDPA training, eager vs compiled decoding, quantized bases, then FlexAttention training.
    common = ["--model", "chatglm-6b", "--batch-size", "8", "--seq-len", "512", "--steps", "5"]
    for name, flags in TRAIN_CASES.items():
        result["train"][name]["sdpa"] = run_bench("train.py", [*common, *flags, "--attention", "sdpa"], left(120))
    result["generate"] = gen = run_bench("generate.py", ["--model", "chatglm-6b", "--batch-size", *BATCHES,
                                                         "--prompt-len", "128", "--new-tokens", "64", "--compile"],
                                         left(300))
    for r in gen.get("runs", []):
        bound_s = gen["weight_bytes_per_step"] / (result["bandwidth_tb_s"] * 1e12)
        r["bound_fraction"] = bound_s / (r["decode_step_ms"] / 1e3)
    for mode in QUANT_MODES:
        argv = ["--model", "chatglm-6b", "--batch-size", "1", "--prompt-len", "128", "--new-tokens", "64", "--compile",
                "--quantize", mode]
        result["quantized"][mode] = run_bench("generate.py", argv, left(150))
    result["int4_training"] = run_bench("train.py", [*common, *TRAIN_CASES["LoRA QKV last 3"], "--quantize", "int4"],
                                        left(120))
    for name, flags in TRAIN_CASES.items():
        result["train"][name]["flex"] = run_bench("train.py", [*common, *flags, "--attention", "flex"], left(150))
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", result)
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
