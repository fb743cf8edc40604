"""Evaluate runs as the study did, and print the comparison table.

    python evaluate.py --model PATH|tiny [--checkpoint RUN] --dataset roleplay_all_test,alpaca_gpt4_zh
    torchrun --nproc_per_node N evaluate.py ...      # samples split across ranks, same scores as 1 process
    python evaluate.py [--runs runs] [--model PATH]  # the table of every run (evaluating missing ones with --model)
    python evaluate.py --from-predictions FILE       # recompute metrics.json from generated_predictions.jsonl
    python evaluate.py --chat --model PATH [--checkpoint RUN]

Generation follows the study: sampling with top_p 0.7, temperature 0.95, at most 768 tokens of prompt plus
answer. Each sample draws from its own generator seeded by (--seed, sample index), and the batches are
fixed before they are dealt to ranks, so predictions do not depend on the number of processes.
Finished batches are appended to a partial file; an interrupted evaluation resumes from it.
"""
import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from adapters import base_model_id, load_adapter, merge_lora
from data import add_data_args, build_eval_samples, build_prompt, encode_prompt
from files import read_jsonl, write_text
from metrics import DEFINITION, METRICS, corpus_scores, versions
from model import generate_ids, load_model, load_tokenizer
from runtime import DTYPES, init_distributed

EVAL_SETS = "roleplay_all_test,alpaca_gpt4_zh"
METRIC_TITLES = {"bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-l"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (released layout) or a preset (tiny: random weights)")
    p.add_argument("--checkpoint",
                   help="run directory with adapter.json (train.py --output-dir); omit for the base model")
    p.add_argument("--output-dir", help="where <dataset>/generated_predictions.jsonl and metrics.json go "
                                        "(default: CHECKPOINT/eval, or eval/ for the base model)")
    add_data_args(p)
    p.set_defaults(dataset=EVAL_SETS, max_samples=100)
    g = p.add_argument_group("generation (defaults: the study's)")
    g.add_argument("--max-length", type=int, default=768, help="prompt + answer tokens at most")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--top-p", type=float, default=0.7)
    g.add_argument("--temperature", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=42, help="sample i draws from a generator seeded by (seed, i)")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per batch per process")
    g.add_argument("--precision", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--timeout-minutes", type=float, default=30, help="process-group timeout (torchrun)")
    g.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa", help="attention kernel")
    g.add_argument("--compile", action="store_true", help="compiled decode step (CUDA graphs on CUDA); same tokens")
    t = p.add_argument_group("other modes")
    t.add_argument("--runs", help="print the table of every run under this directory (default mode, runs/)")
    t.add_argument("--bold-top", type=int, default=1, help="bold the K best values of each table column")
    t.add_argument("--from-predictions", help="recompute metrics.json from a generated_predictions.jsonl")
    t.add_argument("--chat", action="store_true", help="multi-turn chat on stdin ('clear' resets, 'exit' quits)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model
def load_for_inference(model_path: str, checkpoint, precision, device):
    """Base model (+ adapter; LoRA merged for inference) in the inference dtype -> (model, identity)."""
    dtype = DTYPES[precision or ("bf16" if device.type == "cuda" else "fp32")]
    model = load_model(model_path, dtype=dtype, device=device)
    identity = {"model": {"path": str(model_path), "base_model_id": base_model_id(model.config),
                          "dtype": str(dtype).removeprefix("torch.")}, "checkpoint": None}
    if checkpoint is not None:
        spec = load_adapter(model, checkpoint)  # raises if the adapter was made for another base model
        if spec.method == "lora":
            merge_lora(model)  # one matmul per projection again: generation runs at base-model speed
        files = sorted(p for p in Path(checkpoint).iterdir() if p.name.startswith("adapter") and p.is_file())
        identity["checkpoint"] = {"path": str(checkpoint), "adapter": spec.to_dict(),
                                  "sha256": {p.name: file_sha256(p) for p in files}}
    model.eval()
    return model, identity


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- generation
def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def generate_batch(model, tokenizer, batch: list[dict], args) -> list[dict]:
    """One batch of eval samples -> prediction records. A sample's answer stops at <eop> or when its prompt +
    answer reach --max-length; it does not depend on the other samples of the batch."""
    model.transformer.attention = args.attention
    rows = generate_ids(model, [s["input_ids"] for s in batch], max_new_tokens=args.max_length,
                        max_length=args.max_length, do_sample=not args.greedy, top_p=args.top_p,
                        temperature=args.temperature, seeds=[sample_seed(args.seed, s["index"]) for s in batch],
                        compiled=args.compile)
    records = []
    for s, row in zip(batch, rows):
        ended = bool(row) and row[-1] == tokenizer.eop_id
        text = tokenizer.decode(row[:-1] if ended else row)
        records.append({"index": s["index"], "prompt": s["prompt"], "label": s["label"], "predict": text,
                        "hit_length_cap": not ended})
    return records


def length_sorted_batches(samples: list[dict], batch_size: int) -> list[list[dict]]:
    """Longest prompts first (an out-of-memory shows at once); similar lengths share a batch (little padding)."""
    order = sorted(samples, key=lambda s: (-len(s["input_ids"]), s["index"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def evaluate_dataset(model, tokenizer, identity: dict, name: str, samples: list[dict], out_dir: Path, args,
                     rank: int, world: int) -> dict | None:
    """Generate (resuming), gather on rank 0, write predictions + metrics. Returns the metrics on rank 0."""
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = generation_settings(args)
    # partial predictions are reused only under the same model, data and settings (not batch size or world
    # size: predictions do not depend on them)
    key = hashlib.sha1(json.dumps([identity, name, str(args.dataset_dir), args.max_samples, settings],
                                  sort_keys=True).encode()).hexdigest()[:12]
    partial_files = sorted(out_dir.glob(f"generated_predictions.partial-{key}.rank*.jsonl"))

    # rank 0 decides what is already done, so every rank deals the same remaining batches
    done = {r["index"]: r for f in partial_files for r in read_jsonl(f)} if rank == 0 else {}
    done_indices = [sorted(done)]
    if world > 1:
        dist.broadcast_object_list(done_indices, src=0)
    skip = set(done_indices[0])
    todo = [s for s in samples if s["index"] not in skip]
    mine = length_sorted_batches(todo, args.batch_size)[rank::world]
    if rank == 0 and done:
        print(f"{name}: resuming, {len(done)} of {len(samples)} predictions already written")

    new = []
    own_file = out_dir / f"generated_predictions.partial-{key}.rank{rank}.jsonl"
    with open(own_file, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # after a crash mid-line, start the next record on a line of its own
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        for batch in tqdm(mine, desc=name, unit="batch", disable=rank != 0):
            records = generate_batch(model, tokenizer, batch, args)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            new.extend(records)

    gathered = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(new, gathered, dst=0)
    else:
        gathered = [new]
    metrics = None
    if rank == 0:
        for part in gathered:
            done.update((r["index"], r) for r in part)
        missing = [s["index"] for s in samples if s["index"] not in done]
        if missing:
            raise RuntimeError(f"{name}: predictions missing for sample indices {missing[:10]}")
        records = [done[s["index"]] for s in samples]  # input order
        settings.update(batch_size=args.batch_size, world_size=world)
        metrics = finalize(records, out_dir, name, identity, settings, args, time.time() - start)
        for f in out_dir.glob("generated_predictions.partial-*.jsonl"):
            f.unlink()
    if world > 1:
        dist.barrier()
    return metrics


def generation_settings(args) -> dict:
    return {"do_sample": not args.greedy, "top_p": args.top_p, "temperature": args.temperature,
            "max_length": args.max_length, "seed": args.seed, "max_source_length": args.max_source_length,
            "source_prefix": args.source_prefix}


def finalize(records: list[dict], out_dir: Path, name: str, identity: dict, settings: dict, args,
             runtime_s: float) -> dict:
    write_text(out_dir / "generated_predictions.jsonl",
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    metrics = metrics_record(records, name)
    metrics.update(generation=settings, dataset_dir=str(args.dataset_dir), max_samples=args.max_samples,
                   runtime_s=round(runtime_s, 2), **identity)
    write_text(out_dir / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    print(f"{name}: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in METRICS) +
          f"  ({metrics['n_samples']} samples, {metrics['n_length_capped']} hit the length cap) -> {out_dir}")
    return metrics


def metrics_record(records: list[dict], name: str) -> dict:
    scores = corpus_scores([r["predict"] for r in records], [r["label"] for r in records])
    return {"dataset": name, **scores, "n_samples": len(records),
            "n_length_capped": sum(bool(r.get("hit_length_cap")) for r in records),
            "metric_definition": DEFINITION, "versions": versions()}


def evaluate_run(args, checkpoint, out_dir: Path, datasets: list[str], rank: int, world: int, device) -> dict:
    """Every input is checked (datasets read, model and adapter loaded) before the first token is generated."""
    tokenizer = load_tokenizer(args.model)
    all_samples = {name: build_eval_samples(tokenizer, name, args.dataset_dir, args.max_samples,
                                            args.max_source_length, args.source_prefix, args.skip_bad_records)
                   for name in datasets}
    model, identity = load_for_inference(args.model, checkpoint, args.precision, device)
    return {name: evaluate_dataset(model, tokenizer, identity, name, samples, out_dir / name, args, rank, world)
            for name, samples in all_samples.items()}


def recompute(predictions: Path) -> dict:
    """--from-predictions: metrics.json next to the file, scores recomputed, generation details kept."""
    records = read_jsonl(predictions)
    if not records:
        raise ValueError(f"{predictions}: no prediction records (expected generated_predictions.jsonl lines with "
                         "'predict' and 'label')")
    path = predictions.parent / "metrics.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    metrics = {**old, **metrics_record(records, old.get("dataset", predictions.parent.name))}
    write_text(path, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in (*METRICS, "n_samples", "n_length_capped")}))
    return metrics


# ----------------------------------------------------------------------------- the table
def read_runs(runs_dir: Path, datasets: list[str]) -> list[dict]:
    """Every runs_dir/*/run.json with its metrics per evaluation set (None where missing), sorted by id."""
    runs = []
    for run_json in runs_dir.glob("*/run.json"):
        run = json.loads(run_json.read_text(encoding="utf-8"))
        run["dir"] = run_json.parent
        run["metrics"] = {}
        for name in datasets:
            m = run_json.parent / "eval" / name / "metrics.json"
            run["metrics"][name] = json.loads(m.read_text(encoding="utf-8")) if m.is_file() else None
        runs.append(run)
    return sorted(runs, key=lambda r: int(r["id"]))


def table_rows(runs: list[dict], datasets: list[str]) -> list[list[str]]:
    """Formatted cells per run: id, method, target, layers, aux, then the values (two decimals; missing '-')."""
    rows = []
    for run in runs:
        cells = [str(run["id"]), str(run.get("method", "-")), str(run.get("target", "-")),
                 str(run.get("layers", "-")), "yes" if run.get("aux") else "no"]
        for name in datasets:
            m = run["metrics"][name]
            cells += [f"{m[k]:.2f}" if m else "-" for k in METRICS]
        rows.append(cells)
    return rows


def bold_best(rows: list[list[str]], first_value_col: int, top: int) -> list[list[str]]:
    """Bold every value among the `top` highest distinct values of its column (as displayed, so ties tie)."""
    out = [list(r) for r in rows]
    for c in range(first_value_col, len(rows[0]) if rows else 0):
        values = sorted({float(r[c]) for r in rows if r[c] != "-"}, reverse=True)[:top]
        for r in out:
            if r[c] != "-" and float(r[c]) in values:
                r[c] = f"**{r[c]}**"
    return out


def markdown_table(runs: list[dict], datasets: list[str], top: int) -> str:
    """The study's layout: a header naming the sets, a separator, a row naming the metrics, one row per run."""
    rows = bold_best(table_rows(runs, datasets), 5, top)
    header = ["id", "method", "target", "layers", "aux"]
    for name in datasets:
        header += [name, "-", "-", "-"]
    metric_row = ["-"] * 5 + [METRIC_TITLES[m] for _ in datasets for m in METRICS]
    lines = [header, ["-" * len(h) for h in header], metric_row] + rows
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def write_csv(path: Path, runs: list[dict], datasets: list[str]):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "name", "method", "target", "layers", "aux"] +
                   [f"{n}/{m}" for n in datasets for m in METRICS])
        for run in runs:
            values = [run["metrics"][n][m] if run["metrics"][n] else "" for n in datasets for m in METRICS]
            w.writerow([run["id"], run.get("name", run["dir"].name), run.get("method"), run.get("target"),
                        run.get("layers"), bool(run.get("aux"))] + values)


def write_chart(path: Path, runs: list[dict], datasets: list[str]):
    """A heatmap: one row per run, one column per (set, metric); colour = value / best of its column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[run["metrics"][n][m] if run["metrics"][n] else np.nan for n in datasets for m in METRICS]
                       for run in runs], dtype=float)  # (runs, sets * 4)
    best = np.array([max(col[~np.isnan(col)], default=0.0) for col in values.T])
    shade = values / np.where(best > 0, best, 1.0)
    fig, ax = plt.subplots(figsize=(2 + 1.1 * values.shape[1], 1.2 + 0.38 * max(len(runs), 1)))
    ax.imshow(shade, cmap="YlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if shade[i, j] > 0.7 else "black")
    for j in range(len(METRICS), values.shape[1], len(METRICS)):
        ax.axvline(j - 0.5, color="black", linewidth=1.5)  # between evaluation sets
    ax.set_xticks(range(values.shape[1]),
                  [f"{n}\n{METRIC_TITLES[m]}" for n in datasets for m in METRICS], fontsize=7)
    ax.set_yticks(range(len(runs)), [f"{r['id']} {r.get('method')} {r.get('target')} {r.get('layers')}"
                                      f"{' aux' if r.get('aux') else ''}" for r in runs], fontsize=8)
    ax.set_title("BLEU-4 / ROUGE per run (colour: fraction of the column's best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(args, rank: int, world: int, device) -> str:
    runs_dir = Path(args.runs or "runs")
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no runs directory; run launch.sh first or pass --runs DIR")
    datasets = args.dataset.split(",")
    runs = read_runs(runs_dir, datasets)
    if not runs:
        raise FileNotFoundError(f"{runs_dir}: no */run.json; launch.sh writes one per run")
    missing = [(run, [n for n in datasets if run["metrics"][n] is None]) for run in runs]
    missing = [(run, names) for run, names in missing if names]
    if args.model is not None and missing:
        for run, names in missing:
            checkpoint = None if run.get("method", "none") == "none" else run["dir"]  # id 0: the base model
            evaluate_run(args, checkpoint, run["dir"] / "eval", names, rank, world, device)
        runs, missing = read_runs(runs_dir, datasets), []
    if rank != 0:
        return ""
    text = markdown_table(runs, datasets, args.bold_top)
    print(text, end="")
    for run, names in missing:
        print(f"missing: run {run['id']} ({run['dir']}) has no metrics for {', '.join(names)}; "
              "pass --model to evaluate it")
    (runs_dir / "results.md").write_text(text, encoding="utf-8")
    write_csv(runs_dir / "results.csv", runs, datasets)
    write_chart(runs_dir / "results.png", runs, datasets)
    return text


# ----------------------------------------------------------------------------- chat
def chat(args, device):
    tokenizer = load_tokenizer(args.model)
    model, _ = load_for_inference(args.model, args.checkpoint, args.precision, device)
    history, turn = [], 0
    print("chat: 'clear' resets the history, 'exit' or end of input quits", flush=True)
    for line in sys.stdin:
        query = line.rstrip("\n")
        if query.strip() == "exit":
            break
        if query.strip() == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not query.strip():
            continue
        ids = encode_prompt(tokenizer, build_prompt(query, history, args.source_prefix), args.max_source_length)
        sample = {"index": turn, "prompt": "", "label": "", "input_ids": ids}
        answer = generate_batch(model, tokenizer, [sample], args)[0]["predict"]
        print(f"ChatGLM: {answer}", flush=True)
        history.append([query, answer])
        turn += 1


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.timeout_minutes)
    try:
        if args.from_predictions:
            recompute(Path(args.from_predictions))
        elif args.chat:
            if args.model is None:
                raise ValueError("--chat needs --model (a checkpoint directory or a preset)")
            chat(args, device)
        elif args.model is None or args.runs is not None:
            table(args, rank, world, device)
        else:
            out_dir = Path(args.output_dir or (Path(args.checkpoint) / "eval" if args.checkpoint else "eval"))
            evaluate_run(args, args.checkpoint, out_dir, args.dataset.split(","), rank, world, device)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what and where, no traceback
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
