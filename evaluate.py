"""Evaluate runs as the study did, and print the comparison table.

    python evaluate.py [--model PATH|tiny] [--run RUN] [--dataset roleplay_all_test,alpaca_gpt4_zh]
    python evaluate.py ... --seeds 42,1,2            # sampled once per seed, and the summary over the seeds
    torchrun --nproc_per_node N evaluate.py ...      # samples split across ranks, same scores as 1 process
    python evaluate.py --runs runs [--model PATH]    # the table of every run (evaluating missing ones with --model),
                                                     # and runs/report.html: the table, the answers side by side
    python evaluate.py --from-predictions FILE       # recompute metrics.json from generated_predictions.jsonl
    python evaluate.py --chat --model PATH [--run RUN] [--quantize int4]   # int8/int4 frozen weights

Generation follows the study: sampling with top_p 0.7, temperature 0.95, at most 768 tokens of prompt plus
answer. Each sample draws from its own generator seeded by (--seed, sample index), and the batches are
fixed before they are dealt to ranks, so predictions do not depend on the number of processes.
Finished batches are appended to a partial file; an interrupted evaluation resumes from it.

Per set, OUTPUT_DIR/<set>/ gets generated_predictions.jsonl, scores.jsonl (each sample's BLEU-4 / ROUGE and the
NLL of its reference answer) and metrics.json: the study's means, each with its 95% bootstrap interval over samples
(study/stats.py), the teacher-forced NLL of the reference answers and its perplexity (forgetting measured without
sampling: a forward pass over the training encoding of prompt + answer, --max-source-length and
--max-target-length as train.py truncates), empty answers, answer lengths and generation speed.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from adapters import METHODS, base_model_id, load_adapter
from data import DataSettings, add_data_args, build_eval_samples, build_prompt, collate_train, encode_train
from data.registry import reserved_in
from model.chatglm import ATTENTION_KERNELS
from model.generate import generate_ids, sample_seed
from model.loader import load_model
from model.loss import IGNORE, linear_cross_entropy, next_token_targets
from model.quant import MODES as QUANT_MODES, quantize_model
from model.tokenizer import load_tokenizer
from runtime.files import (InputError, append_jsonl, digest, drop_torn_tail, explain, load_json, read_jsonl, write_json,
                           write_jsonl)
from runtime.flags import COUNT, FINITE, POSITIVE, PROBABILITY, from_flags, number
from runtime.precision import DTYPES, add_precision_arg, precision
from runtime.process import gather, init_distributed, say_once
from study.fingerprint import adapter_sha256, code_fingerprint, data_fingerprint, git_commit
from study.grid import EVAL_SAMPLES, EVAL_SETS, MODEL_HELP, resolve_model
from study.metrics import DEFINITION, METRICS, NLL_DEFINITION, prediction_stats, sample_scores, score_stats, versions
from study.report import write_report
from study.results import read_runs, write_results
from study.rundir import (EVAL, METRICS as METRICS_FILE, PREDICTIONS, SCORES, partial_predictions, read_predictions,
                          read_scores)

# The NLL pass's batches: at most --batch-size samples and this many tokens with padding. Prompt + reference answer
# spread wider in length than prompts alone: smaller batches waste less on padding (the demo's role-play set on CPU:
# one batch of 100 samples took twice as long), and 1024 tokens still fill most of a GPU's matmuls at the 6B width.
NLL_BATCH_TOKENS = 1024


def seed_list(text: str) -> list[int]:
    """--seeds 42,1,2 -> [42, 1, 2]: distinct integers."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a seed appears twice in {text!r}")
    return seeds


@dataclass(frozen=True)
class Loading:
    """Which model, with which run's adapter, loaded how."""
    model: str | None  # a model directory or preset; None: the table alone needs no model
    run: str | None  # a run directory (train.py --output-dir) or an adapter directory; None: the base model
    precision: str | None  # None: the default for the device (runtime/precision.py)
    quantize: str = "none"
    force: bool = False  # apply an adapter trained on other base weights


@dataclass(frozen=True)
class Settings:
    """Everything evaluate.py is given, typed; one of the modes: evaluate (the default), runs, from_predictions,
    chat."""
    load: Loading
    data: DataSettings
    gen: "GenerationSettings"
    seeds: list[int]  # the sets are sampled once per seed; one seed: --seed
    output_dir: str | None
    timeout_minutes: float
    runs: str | None
    bold_top: int
    from_predictions: str | None
    chat: bool


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--run", "--checkpoint", dest="run",
                   help="a run directory (train.py --output-dir, with adapter.json) or an adapter directory; omit "
                        "for the base model (--checkpoint: the same, its former name)")
    p.add_argument("--output-dir", help="where <dataset>/generated_predictions.jsonl and metrics.json go "
                                        "(default: RUN/eval, or eval/ for the base model)")
    add_data_args(p)
    p.set_defaults(dataset=",".join(EVAL_SETS), max_samples=EVAL_SAMPLES)
    g = p.add_argument_group("generation (defaults: the study's)")
    g.add_argument("--max-length", type=number(int, low=3), default=768, help="prompt + answer tokens at most")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--top-p", type=PROBABILITY, default=0.7, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--temperature", type=FINITE, default=0.95, help="> 0 (sampling); --greedy for argmax decoding")
    g.add_argument("--seed", type=int, default=42, help="sample i draws from a generator seeded by (seed, i)")
    g.add_argument("--seeds", type=seed_list,
                   help="comma-separated, e.g. 42,1,2: sample every set once per seed (OUTPUT_DIR/seed-S/<set>/), "
                        "the summary in OUTPUT_DIR/<set>/ (mean and sd over seeds, pooled interval); replaces --seed")
    g.add_argument("--batch-size", type=COUNT, default=32, help="prompts per batch per process")
    add_precision_arg(g, "the model's weights and compute")
    g.add_argument("--quantize", choices=QUANT_MODES, default="none",
                   help="the blocks' Linear weights stored int8 (per output channel) or int4 (groups of 128) and "
                        "dequantized at each matmul; LoRA then stays unmerged beside them")
    g.add_argument("--timeout-minutes", type=POSITIVE, default=30, help="process-group timeout (torchrun)")
    g.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa", help="attention kernel")
    g.add_argument("--compile", action="store_true", help="compiled decode step (CUDA graphs on CUDA); same tokens")
    t = p.add_argument_group("other modes")
    t.add_argument("--runs", nargs="?", const="runs",
                   help="print the table of every run under this directory (runs/); write its report.html")
    t.add_argument("--bold-top", type=COUNT, default=1, help="bold the K best values of each table column")
    t.add_argument("--from-predictions", help="recompute metrics.json from a generated_predictions.jsonl")
    t.add_argument("--chat", action="store_true", help="multi-turn chat on stdin ('clear' resets, 'exit' quits)")
    p.add_argument("--force", action="store_true", help="apply an adapter even if it was trained on other base weights")
    args = p.parse_args(argv)
    if not args.greedy and args.temperature <= 0:
        p.error(f"--temperature must be > 0 for sampling, got {args.temperature:g}; use --greedy for argmax decoding")
    if args.greedy and args.seeds and len(args.seeds) > 1:
        p.error("--seeds with --greedy: greedy answers are the same for every seed; drop one of the two flags")
    if args.runs is None or args.model is not None:  # the table alone needs no model
        args.model, note = resolve_model(args.model)
        if note and not args.from_predictions:
            say_once(note)
    return Settings(load=from_flags(Loading, args), data=from_flags(DataSettings, args),
                    gen=GenerationSettings.from_args(args), seeds=args.seeds or [args.seed],
                    output_dir=args.output_dir, timeout_minutes=args.timeout_minutes, runs=args.runs,
                    bold_top=args.bold_top, from_predictions=args.from_predictions, chat=args.chat)


# ----------------------------------------------------------------------------- model
def load_for_inference(load: Loading, device):
    """The base model (+ the run's adapter, merged where its method can) in the inference dtype, its blocks'
    Linears quantized by --quantize -> (model, identity)."""
    model_path, run, quantize = load.model, load.run, load.quantize
    dtype = DTYPES[precision(load.precision, device.type)]
    # Quantizing, the base is loaded on the CPU and goes to the device layer by layer: never whole in float there.
    model = load_model(model_path, dtype=dtype, device=device if quantize == "none" else "cpu").requires_grad_(False)
    identity = {"model": {"path": str(model_path), "base_model_id": base_model_id(model.config),
                          "dtype": str(dtype).removeprefix("torch."),
                          **({"quantize": quantize} if quantize != "none" else {})}, "adapter": None}
    if run is not None:
        spec = load_adapter(model, run, load.force)  # checked on the float weights: made for another base?
        if quantize != "none" and spec.method == "full":
            raise ValueError(f"{run}: --quantize {quantize} quantizes the weights an adapter leaves frozen, and "
                             "full fine-tuning trained them all; export it (python -m adapters --model BASE "
                             "--adapter RUN --output DIR) and evaluate --model DIR --quantize " + quantize)
        merge = METHODS[spec.method].merge
        if merge is not None and quantize == "none":  # LoRA cannot merge into quantized weights: it stays beside
            merge(model)  # LoRA: one matmul per projection again, generation runs at base-model speed
        identity["adapter"] = {"path": str(run), "settings": spec.to_dict(), "sha256": adapter_sha256(run)}
    quantize_model(model, quantize, device)  # the frozen ones: Freeze's trained layers stay float, as in training
    model.to(device).eval()
    return model, identity


# ----------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated, built once from the flags. `record()` (all but the batch size, the kernel
    and compilation, which change only the speed) is what the predictions depend on: metrics.json records
    it, in this order, and a resume must match it."""
    do_sample: bool  # False: greedy
    top_p: float
    temperature: float
    max_length: int  # prompt + answer tokens at most
    seed: int  # sample i draws from a generator seeded by sample_seed(seed, i)
    max_source_length: int  # prompt tokens at most (data.encode_prompt)
    source_prefix: str  # text put in front of every prompt
    batch_size: int  # prompts per batch per process
    attention: str  # attention kernel (model.ATTENTION_KERNELS)
    compiled: bool  # compiled decode step

    @classmethod
    def from_args(cls, args) -> "GenerationSettings":
        return cls(do_sample=not args.greedy, top_p=args.top_p, temperature=args.temperature,
                   max_length=args.max_length, seed=args.seed, max_source_length=args.max_source_length,
                   source_prefix=args.source_prefix, batch_size=args.batch_size, attention=args.attention,
                   compiled=args.compile)

    def record(self) -> dict:
        """What the answers depend on; the last three fields only change how fast they come."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch_size", "attention", "compiled")}


def generate_batch(model, tokenizer, batch: list[dict], gen: GenerationSettings) -> list[dict]:
    """One batch of eval samples -> prediction records. A sample's answer stops at <eop> or when its prompt +
    answer reach max_length; it does not depend on the other samples of the batch."""
    model.transformer.attention = gen.attention
    rows = generate_ids(model, [s["input_ids"] for s in batch], max_new_tokens=gen.max_length,
                        max_length=gen.max_length, do_sample=gen.do_sample, top_p=gen.top_p,
                        temperature=gen.temperature, seeds=[sample_seed(gen.seed, s["index"]) for s in batch],
                        compiled=gen.compiled)
    records = []
    for s, row in zip(batch, rows):
        ended = bool(row) and row[-1] == tokenizer.eop_id
        text = tokenizer.decode(row, skip_special_tokens=True)  # the study's rule (model.tokenizer.SKIPPED_PIECES)
        records.append({"index": s["index"], "prompt": s["prompt"], "label": s["label"], "predict": text,
                        "hit_length_cap": not ended, "new_tokens": len(row)})
    return records


def length_sorted_batches(samples: list[dict], batch_size: int, max_tokens: float = math.inf) -> list[list[dict]]:
    """Longest first (an out-of-memory shows at once); similar lengths share a batch (little padding). A batch
    holds at most batch_size samples and at most max_tokens tokens with its padding (one sample in any case)."""
    batches = []
    for s in sorted(samples, key=lambda s: (-len(s["input_ids"]), s["index"])):
        if batches and len(batches[-1]) < batch_size and \
                (len(batches[-1]) + 1) * len(batches[-1][0]["input_ids"]) <= max_tokens:
            batches[-1].append(s)
        else:
            batches.append([s])
    return batches


def evaluate_dataset(model, tokenizer, identity: dict, name: str, samples: list[dict], out_dir: Path,
                     gen: GenerationSettings, selection: dict, nll: dict | None, rank: int, world: int) -> dict | None:
    """Generate (resuming), gather on rank 0, write predictions + scores + metrics. Returns the metrics on rank 0.

    `selection` says which samples: {"dataset_dir", "max_samples"} (recorded in metrics.json); `nll` is
    reference_nll's result for these samples (rank 0)."""
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    # partial predictions are reused only under the same model, data and settings (not batch size or world
    # size: predictions do not depend on them)
    key = digest([identity, name, selection["dataset_dir"], selection["max_samples"], gen.record()])
    done = resumed_predictions(out_dir, key, rank)
    todo = [s for s in samples if s["index"] not in skipped(done, world)]
    if rank == 0 and done:
        print(f"{name}: resuming, {len(done)} of {len(samples)} predictions already written")
    batches = length_sorted_batches(todo, gen.batch_size)[rank::world]
    new = generate_appending(out_dir / partial_predictions(key, rank), batches, model, tokenizer, gen, name, rank)
    gathered = gather(new, rank, world)
    metrics = None
    if rank == 0:
        timing = {"generation_s": time.time() - start, "generated_tokens": sum(r["new_tokens"] for part in gathered
                                                                                for r in part)}
        for part in gathered:
            done.update((r["index"], r) for r in part)
        missing = [s["index"] for s in samples if s["index"] not in done]
        if missing:
            raise RuntimeError(f"{name}: predictions missing for sample indices {missing[:10]}")
        records = [done[s["index"]] for s in samples]  # input order
        settings = {**gen.record(), "batch_size": gen.batch_size, "world_size": world}
        metrics = finalize(records, out_dir, name, identity, settings, selection, nll, timing, time.time() - start)
        for f in out_dir.glob(partial_predictions("*", "*")):
            f.unlink()
    if world > 1:
        dist.barrier()
    return metrics


def resumed_predictions(out_dir: Path, key: str, rank: int) -> dict[int, dict]:
    """Rank 0: the records of an interrupted evaluation with the same key, by sample index; other ranks: {}. A
    record the interruption (a kill, a full disk) left unfinished is dropped, with one line: it is generated again."""
    if rank != 0:
        return {}
    done = {}
    for f in sorted(out_dir.glob(partial_predictions(key, "*"))):
        if drop_torn_tail(f):
            print(f"{f}: dropped its last record, which an interrupted write left unfinished; it is generated again")
        done.update((r["index"], r) for r in read_jsonl(f))
    return done


def skipped(done: dict, world: int) -> set[int]:
    """The indices rank 0 found done, on every rank, so that every rank deals the same remaining batches."""
    indices = [sorted(done)]
    if world > 1:
        dist.broadcast_object_list(indices, src=0)
    return set(indices[0])


def generate_appending(path: Path, batches: list[list[dict]], model, tokenizer, gen: GenerationSettings,
                       name: str, rank: int) -> list[dict]:
    """Generate batch after batch, appending each batch's records to `path` as it finishes. -> the records."""
    new = []
    for batch in tqdm(batches, desc=name, unit="batch", disable=rank != 0):
        records = generate_batch(model, tokenizer, batch, gen)
        append_jsonl(path, records)
        new.extend(records)
    return new


# ----------------------------------------------------------------------------- forgetting, without sampling
def reference_nll(model, tokenizer, samples: list[dict], gen: GenerationSettings, max_target_length: int,
                  rank: int, world: int, device) -> dict | None:
    """The teacher-forced NLL of every reference answer, encoded exactly as for training (data.encode_train), in
    length-sorted batches dealt to ranks; no generation. -> on rank 0 {"per_sample": {index: (mean token NLL,
    tokens)}, "max_source_length", "max_target_length", "truncated" (samples cut), "runtime_s"}; None elsewhere."""
    start = time.time()
    encoded, truncated = [], 0
    for s in samples:
        ids, labels, cut = encode_train(tokenizer, s["prompt"], s["label"], gen.max_source_length, max_target_length)
        encoded.append({"index": s["index"], "input_ids": ids, "labels": labels})
        truncated += cut
    model.transformer.attention = gen.attention
    mine = {}
    with torch.no_grad():
        for batch in length_sorted_batches(encoded, gen.batch_size, NLL_BATCH_TOKENS)[rank::world]:
            values = sample_nll(model, collate_train(batch, tokenizer.pad_id), device)
            mine.update(zip([s["index"] for s in batch], values))
    gathered = gather(mine, rank, world)
    if rank != 0:
        return None
    return {"per_sample": {i: v for part in gathered for i, v in part.items()},
            "max_source_length": gen.max_source_length, "max_target_length": max_target_length,
            "truncated": truncated, "runtime_s": round(time.time() - start, 2)}


def sample_nll(model, batch: dict, device) -> list[tuple[float, int]]:
    """A training batch (data.collate_train) -> per sample (mean NLL of its label tokens, their count): the
    training loss (model.token_loss_sum, the same targets) split by sample; one forward for the whole batch,
    then the fused output layer + loss (model.linear_cross_entropy) row by row."""
    targets = next_token_targets(batch["labels"].to(device))  # (B, T)
    h = model.transformer(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, T, H)
    sums = torch.stack([linear_cross_entropy(h[i], model.lm_head.weight, targets[i]) for i in range(len(h))])
    counts = (targets != IGNORE).sum(dim=1)  # (B,)
    return [(s / n, n) for s, n in zip(sums.tolist(), counts.tolist())]


# ----------------------------------------------------------------------------- scores
def finalize(records: list[dict], out_dir: Path, name: str, identity: dict, settings: dict, selection: dict,
             nll: dict | None, timing: dict, runtime_s: float) -> dict:
    """generated_predictions.jsonl, scores.jsonl (per sample) and metrics.json of one set."""
    write_jsonl(out_dir / PREDICTIONS, records)
    metrics, rows = metrics_record(records, name, nll and nll["per_sample"])
    write_jsonl(out_dir / SCORES, rows)
    commit, dirty = git_commit()
    lengths = {k: nll[k] for k in ("max_source_length", "max_target_length")} if nll else None
    metrics.update(generation=settings, **selection, runtime_s=round(runtime_s, 2),
                   generation_s=round(timing["generation_s"], 2), generated_tokens=timing["generated_tokens"],
                   generation_tokens_per_s=tokens_per_s(timing["generated_tokens"], timing["generation_s"]),
                   reference_nll=nll and {k: v for k, v in nll.items() if k != "per_sample"}, **identity,
                   fingerprint=fingerprints(identity, name, selection, settings, lengths), git_commit=commit,
                   git_dirty=dirty)
    write_json(out_dir / METRICS_FILE, metrics)
    print(f"{name}: {summary_line(metrics)} ({metrics['n_samples']} samples, {metrics['n_length_capped']} hit the "
          f"length cap, {metrics['n_empty']} empty) -> {out_dir}")
    return metrics


def summary_line(metrics: dict) -> str:
    """'bleu-4 12.34 [11.02, 13.70]  ...  nll 2.345 [2.301, 2.390]': the means and their 95% bootstrap intervals."""
    parts = []
    for k in (*METRICS, "nll"):
        if k in metrics["interval"]:
            d, (low, high) = 3 if k == "nll" else 2, metrics["interval"][k]
            parts.append(f"{k} {metrics[k]:.{d}f} [{low:.{d}f}, {high:.{d}f}]")
    return "  ".join(parts)


def tokens_per_s(tokens: int, seconds: float) -> float | None:
    """Generation speed of this call (None when it generated nothing: every prediction came from a resumed file)."""
    return round(tokens / max(seconds, 1e-9), 1) if tokens else None


def fingerprints(identity: dict, name: str, selection: dict, generation: dict, nll_lengths: dict | None) -> dict:
    """What these scores depend on (study/fingerprint.py); the table and launch.sh compare "code" with the
    checkout's."""
    adapter = identity["adapter"]
    decisive = {k: v for k, v in generation.items() if k not in ("batch_size", "world_size")}
    return {"code": code_fingerprint(), "data": data_fingerprint(selection["dataset_dir"], [name]),
            "adapter": digest(adapter["sha256"]) if adapter else None,
            "settings": digest({**decisive, **selection, "model": identity["model"], "nll": nll_lengths})}


def metrics_record(records: list[dict], name: str, nll: dict | None) -> tuple[dict, list[dict]]:
    """Prediction records (+ per-sample NLL by index, or None) -> (metrics.json's scores, the per-sample rows)."""
    rows = []
    for r in records:
        row = {"index": r["index"], **sample_scores(r["predict"], r["label"])}
        if nll is not None:
            row["nll"], row["target_tokens"] = nll[r["index"]]
        rows.append(row)
    metrics = {"dataset": name, **score_stats(rows), "n_samples": len(records), **prediction_stats(records),
               "metric_definition": DEFINITION, "nll_definition": NLL_DEFINITION, "versions": versions()}
    return metrics, rows


def evaluate_run(load: Loading, data: DataSettings, gen: GenerationSettings, seeds: list[int], out_dir: Path,
                 datasets: list[str], rank: int, world: int, device) -> dict:
    """Every input is checked (datasets read, model and adapter loaded) before the first token is generated.
    With several seeds: every set once per seed in out_dir/seed-S/<set>/, their summary in out_dir/<set>/."""
    tokenizer = load_tokenizer(load.model)
    all_samples = {name: build_eval_samples(tokenizer, name, data.dataset_dir, data.max_samples,
                                            gen.max_source_length, gen.source_prefix, data.skip_bad_records)
                   for name in datasets}
    model, identity = load_for_inference(load, device)
    selection = {"dataset_dir": str(data.dataset_dir), "max_samples": data.max_samples}
    out = {}
    for name, samples in all_samples.items():
        nll = reference_nll(model, tokenizer, samples, gen, data.max_target_length, rank, world, device)
        if len(seeds) == 1:
            out[name] = evaluate_dataset(model, tokenizer, identity, name, samples, out_dir / name,
                                         replace(gen, seed=seeds[0]), selection, nll, rank, world)
            continue
        dirs = {s: out_dir / f"seed-{s}" / name for s in seeds}
        per_seed = {s: evaluate_dataset(model, tokenizer, identity, name, samples, dirs[s], replace(gen, seed=s),
                                        selection, nll, rank, world) for s in seeds}
        out[name] = summarize_seeds(out_dir / name, per_seed, dirs) if rank == 0 else None
    return out


def summarize_seeds(out_dir: Path, per_seed: dict[int, dict], dirs: dict[int, Path]) -> dict:
    """--seeds: out_dir/metrics.json and scores.jsonl over every seed's predictions of one set. The scores of a
    sample are averaged over the seeds; the metrics are their means and the pooled interval (bootstrap over samples
    of those averages), "seeds" holds each seed's means and their mean and sd; counts and lengths are over all
    predictions. The other fields are the first seed's."""
    seeds = list(per_seed)
    rows = {s: read_jsonl(d / SCORES) for s, d in dirs.items()}
    records = [r for d in dirs.values() for r in read_jsonl(d / PREDICTIONS)]
    pooled = [{**row, **{k: float(np.mean([rows[s][i][k] for s in seeds])) for k in METRICS}}
              for i, row in enumerate(rows[seeds[0]])]  # every seed scored the same samples in the same order
    first = per_seed[seeds[0]]
    by_seed = {k: [per_seed[s][k] for s in seeds] for k in METRICS}
    summary = {**first, **score_stats(pooled), **prediction_stats(records),
               "seeds": {"values": seeds, "mean": {k: float(np.mean(v)) for k, v in by_seed.items()},
                         "sd": {k: float(np.std(v, ddof=1)) for k, v in by_seed.items()},
                         "per_seed": {str(s): {k: per_seed[s][k] for k in METRICS} for s in seeds},
                         "dirs": [str(d.relative_to(out_dir.parent)) for d in dirs.values()]},
               "generation": {**first["generation"], "seed": seeds}}
    for k in ("runtime_s", "generation_s", "generated_tokens"):
        summary[k] = round(sum(per_seed[s][k] for s in seeds), 2)
    summary["generation_tokens_per_s"] = tokens_per_s(summary["generated_tokens"], summary["generation_s"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / SCORES, pooled)
    write_json(out_dir / METRICS_FILE, summary)
    print(f"{first['dataset']} over seeds {','.join(map(str, seeds))}: " + "  ".join(
        f"{k} {summary['seeds']['mean'][k]:.2f} ±{summary['seeds']['sd'][k]:.2f} sd" for k in METRICS) +
          f"; pooled: {summary_line(summary)} -> {out_dir}")
    return summary


def recompute(predictions: Path) -> dict:
    """--from-predictions: metrics.json and scores.jsonl next to the file, scores recomputed; the NLL of each
    sample (from the old scores.jsonl) and the generation details kept."""
    records = read_predictions(predictions)
    path, scores = predictions.parent / METRICS_FILE, predictions.parent / SCORES
    old = load_json(path, "evaluate.py writes this file: delete it to start it afresh") if path.is_file() else {}
    if not isinstance(old, dict):
        raise InputError(f"{path}: not a JSON object; evaluate.py writes this file: delete it to start it afresh")
    nll = {r["index"]: (r["nll"], r["target_tokens"]) for r in read_scores(scores) if "nll" in r
           and "target_tokens" in r} if scores.is_file() else {}
    new, rows = metrics_record(records, old.get("dataset", predictions.parent.name),
                               nll if all(r["index"] in nll for r in records) else None)
    metrics = {**old, **new}
    write_jsonl(scores, rows)
    write_json(path, metrics)
    print(json.dumps({k: metrics[k] for k in (*METRICS, "nll", "n_samples", "n_length_capped", "n_empty")}))
    return metrics


# ----------------------------------------------------------------------------- the table of runs
def table(s: Settings, rank: int, world: int, device) -> str:
    """The comparison table of every run under --runs; with --model, runs missing a set are evaluated first."""
    runs_dir = Path(s.runs or "runs")
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no runs directory; run launch.sh first or pass --runs DIR")
    datasets = s.data.names
    runs = read_runs(runs_dir, datasets)
    if not runs:
        raise FileNotFoundError(f"{runs_dir}: no */run.json; launch.sh writes one per run")
    missing = [(run, [n for n in datasets if run["metrics"][n] is None]) for run in runs]  # damaged ones too
    missing = [(run, names) for run, names in missing if names]
    if s.load.model is not None and missing:
        for run, names in missing:
            adapter = None if run.get("method", "none") == "none" else str(run["dir"])  # id 0: the base model
            evaluate_run(replace(s.load, run=adapter), s.data, s.gen, s.seeds, run["dir"] / EVAL, names, rank,
                         world, device)
        runs, missing = read_runs(runs_dir, datasets), []
    if rank != 0:
        return ""
    text = write_results(runs_dir, runs, datasets, s.bold_top)
    write_report(runs_dir, runs, datasets, s.bold_top)
    print(text, end="")
    for run, names in missing:
        names = [n for n in names if n not in run["unreadable"]]  # the table names those
        if names:
            print(f"missing: run {run['id']} ({run['dir']}) has no metrics for {', '.join(names)}; "
                  "pass --model to evaluate it")
    return text


# ----------------------------------------------------------------------------- chat
def fit_history(tokenizer, query: str, history: list, max_source_length: int, prefix: str = ""):
    """The prompt ids (ending [gMASK] <sop>) of `query` after the latest rounds of `history` that fit in
    max_source_length tokens -> (ids, kept rounds, number of oldest rounds dropped). The query is always whole:
    ids is None when it does not fit even alone. Rounds are renumbered from 0 over the kept ones."""
    for dropped in range(len(history) + 1):
        kept = history[dropped:]
        ids = tokenizer.encode(build_prompt(query, kept, prefix))
        if len(ids) <= max_source_length:
            return ids, kept, dropped
    return None, [], len(history)


def unprinted(printed: str, text: str) -> str:
    """What to print of `text` when `printed` is on the screen: nothing while it ends in U+FFFD (an incomplete
    UTF-8 byte sequence) or does not extend what is shown (a later token may change how earlier ones decode)."""
    if text.endswith("\ufffd") or not text.startswith(printed):
        return ""
    return text[len(printed):]


def stream_answer(model, tokenizer, ids: list[int], gen: GenerationSettings, seed: int, suppress_ids: list[int]):
    """Generate one answer, printing it as it grows -> its text (the study's decode rule)."""
    tokens, shown = [], ""

    def show(step, next_ids):  # next_ids (1,)
        nonlocal shown
        tokens.append(int(next_ids[0]))
        new = unprinted(shown, tokenizer.decode(tokens, skip_special_tokens=True))
        print(new, end="", flush=True)
        shown += new

    print("ChatGLM: ", end="", flush=True)
    row = generate_ids(model, [ids], max_new_tokens=gen.max_length, max_length=gen.max_length,
                       do_sample=gen.do_sample, top_p=gen.top_p, temperature=gen.temperature, seeds=[seed],
                       compiled=gen.compiled, suppress_ids=suppress_ids, on_token=show)[0]
    text = tokenizer.decode(row, skip_special_tokens=True)
    print(unprinted(shown, text), flush=True)
    return text


def read_query() -> str | None:
    """One line typed (or piped) by the user; None at Ctrl-D / end of input or Ctrl-C at the prompt."""
    try:
        return input("\n用户：")
    except (EOFError, KeyboardInterrupt):
        print(flush=True)
        return None


@dataclass
class ChatSession:
    history: list  # [[query, answer], ...]: the finished rounds, the next prompt's context
    answers: int = 0  # answers started so far: the next one samples with sample_seed(seed, answers)
    told: bool = False  # the one notice that old rounds no longer fit was printed


def chat_turn(model, tokenizer, gen: GenerationSettings, suppress: list[int], session: ChatSession, query: str):
    """Answer one line typed at the prompt, storing the round in session.history only once it is whole. Ctrl-C
    anywhere in here (a person presses it when `ChatGLM: ` shows, which may be before or after generate_ids runs)
    stops this turn alone: the history stays as it was and the prompt comes back."""
    try:
        if query.strip() == "clear":
            session.history = []
            print("(history cleared)", flush=True)
            return
        if not query.strip():
            return
        if reserved_in(query):
            print(f"(the message contains {reserved_in(query)!r}, which the tokenizer reads as a special token: "
                  "remove it and send again)", flush=True)
            return
        ids, kept, dropped = fit_history(tokenizer, query, session.history, gen.max_source_length,
                                         gen.source_prefix)
        if ids is None:
            n = len(tokenizer.encode(build_prompt(query, [], gen.source_prefix)))
            print(f"(this message alone is {n} prompt tokens and --max-source-length is {gen.max_source_length}: "
                  "not sent; shorten it or raise --max-source-length)", flush=True)
            return
        if dropped and not session.told:
            print(f"(older rounds no longer fit --max-source-length {gen.max_source_length}: dropped from the "
                  "prompt)", flush=True)
            session.told = True
        seed = sample_seed(gen.seed, session.answers)
        session.answers += 1
        answer = stream_answer(model, tokenizer, ids, gen, seed, suppress)
        # text the model spelled out of ordinary pieces (e.g. "<" "sop" ">") would encode as a special token
        while reserved_in(answer):
            answer = answer.replace(reserved_in(answer), "")
        session.history = kept + [[query, answer]]
    except KeyboardInterrupt:
        print(" (stopped)", flush=True)


def chat(load: Loading, gen: GenerationSettings, device):
    tokenizer = load_tokenizer(load.model)
    model, _ = load_for_inference(load, device)
    model.transformer.attention = gen.attention
    # The special pieces the decode rule keeps as text ([gMASK], [sMASK], <unused_0>, <ENC>, <dBLOCK>) would
    # show on the screen and, re-encoded from the history, break the next prompt: chat never generates them.
    suppress = sorted(set(tokenizer.special_ids.values()) - tokenizer.skipped_ids)
    session = ChatSession(history=[])
    print("chat: 'clear' resets the history, 'exit' / Ctrl-D / Ctrl-C at the prompt quits, "
          "Ctrl-C during an answer stops it", flush=True)
    while (query := read_query()) is not None and query.strip() != "exit":
        chat_turn(model, tokenizer, gen, suppress, session, query)


def main(argv=None):
    s = parse_args(argv)
    rank, world, device = init_distributed(s.timeout_minutes)
    try:
        if s.from_predictions:
            recompute(Path(s.from_predictions))
        elif s.chat:
            try:
                chat(s.load, s.gen, device)
            except KeyboardInterrupt:  # Ctrl-C while the model loads (a turn catches its own): quit quietly
                print(file=sys.stderr)
                sys.exit(130)
        elif s.runs is not None:
            table(s, rank, world, device)
        else:
            out_dir = Path(s.output_dir or (Path(s.load.run) / EVAL if s.load.run else EVAL))
            evaluate_run(s.load, s.data, s.gen, s.seeds, out_dir, s.data.names, rank, world, device)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what and where, no traceback
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only or forbidden path
        print(f"evaluate.py: error: {explain(e)}; batches already finished stay in "
              "generated_predictions.partial-*.jsonl and the same command resumes from them", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if rank == 0:
            print("\nevaluate.py: interrupted; finished batches stay in generated_predictions.partial-*.jsonl and "
                  "the same command resumes from them", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
