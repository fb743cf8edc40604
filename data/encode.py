"""Records -> token ids: training samples (ids + labels) and generation prompts.

Layout (ChatGLM-6B): training `src + [gMASK] <sop> tgt <eop>`, labels -100 up to <sop> and the ids from <sop> on
(after the model's one-step shift the [gMASK] position learns to predict <sop>); prompt `src + [gMASK] <sop>`.
Truncation follows the study's code: the source keeps max_source_length - 2 tokens ([gMASK] and <sop> count
against the source budget), the target keeps max_target_length - 1 ([eop] counts against the target budget), so
a prompt is at most max_source_length tokens and a training sample at most max_source_length + max_target_length.
"""
from model.loss import IGNORE

from .prompt import build_prompt
from .registry import load_records


def encode_prompt(tokenizer, prompt_text: str, max_source_length: int) -> list[int]:
    src = tokenizer.encode(prompt_text, add_special_tokens=False)[:max_source_length - 2]
    return src + [tokenizer.gmask_id, tokenizer.sop_id]


def encode_train(tokenizer, prompt_text: str, response: str, max_source_length: int,
                 max_target_length: int) -> tuple[list[int], list[int], bool]:
    """-> (input_ids, labels, truncated): truncated is True when source or target lost tokens."""
    src = tokenizer.encode(prompt_text, add_special_tokens=False)
    tgt = tokenizer.encode(response, add_special_tokens=False)
    truncated = len(src) > max_source_length - 2 or len(tgt) > max_target_length - 1
    src, tgt = src[:max_source_length - 2], tgt[:max_target_length - 1]
    input_ids = src + [tokenizer.gmask_id, tokenizer.sop_id] + tgt + [tokenizer.eop_id]
    labels = [IGNORE] * (len(src) + 1) + [tokenizer.sop_id] + tgt + [tokenizer.eop_id]
    return input_ids, labels, truncated


def check_lengths(max_source_length: int, max_target_length: int | None = None):
    if max_source_length < 2 or (max_target_length is not None and max_target_length < 2):
        raise ValueError(f"max_source_length ({max_source_length}) and max_target_length ({max_target_length}) "
                         "must be >= 2: [gMASK] <sop> take two source positions, <eop> one target position")


def record_turns(record: dict, expand_history: bool) -> list[tuple[str, list, str]]:
    """(query, preceding history, answer) per training target: the last answer only, or every answer."""
    turns = record["history"] + [[record["prompt"], record["response"]]]
    if not expand_history:
        return [(record["prompt"], record["history"], record["response"])]
    return [(q, turns[:j], a) for j, (q, a) in enumerate(turns)]


def encode_records(tokenizer, records: list[dict], max_source_length: int = 512, max_target_length: int = 512,
                   source_prefix: str = "", expand_history: bool = False) -> tuple[list[dict], dict]:
    """-> ([{"input_ids", "labels"}], counts), in record order. With expand_history an n-turn record gives n samples,
    each answer with its own preceding history; a history turn with an empty query or answer gives no sample
    (counted as dropped_empty_turns) but stays in the later turns' history."""
    check_lengths(max_source_length, max_target_length)
    samples, truncated, dropped = [], 0, 0
    for record in records:
        for query, history, answer in record_turns(record, expand_history):
            if not query or not answer:
                dropped += 1
                continue
            prompt = build_prompt(query, history, source_prefix)
            input_ids, labels, cut = encode_train(tokenizer, prompt, answer, max_source_length, max_target_length)
            samples.append({"input_ids": input_ids, "labels": labels})
            truncated += cut
    return samples, {"samples": len(samples), "truncated": truncated, "dropped_empty_turns": dropped,
                     "max_source_length": max_source_length, "max_target_length": max_target_length}


def build_eval_samples(tokenizer, name: str, dataset_dir, max_samples: int | None = None,
                       max_source_length: int = 512, source_prefix: str = "",
                       skip_bad_records: bool = False) -> list[dict]:
    """File order, first max_samples records -> [{"index": position in the file, "prompt", "input_ids", "label"}].
    The label is the full response text (the reference the metrics compare against)."""
    check_lengths(max_source_length)
    records, _ = load_records([name], dataset_dir, max_samples, seed=None, skip_bad_records=skip_bad_records)
    out = []
    for record in records:
        prompt = build_prompt(record["prompt"], record["history"], source_prefix)
        out.append({"index": record["source"][1], "prompt": prompt,
                    "input_ids": encode_prompt(tokenizer, prompt, max_source_length), "label": record["response"]})
    return out


def format_report(report: dict) -> str:
    lines = []
    for name, c in report["datasets"].items():
        lines.append(f"{name}: {c['in_file']} in {c['file']}, read {c['read']}, kept {c['kept']}, "
                     f"dropped empty {c['dropped_empty']}, skipped bad {c['skipped_bad']}")
    lines.append(f"records: {report['records']}")
    if "samples" in report:
        lines.append(f"samples: {report['samples']} (truncated {report['truncated']} at source "
                     f"{report['max_source_length']} / target {report['max_target_length']}; "
                     f"dropped empty turns {report['dropped_empty_turns']})")
    if report.get("val_samples"):
        lines.append(f"validation: {report['val_samples']} samples (from {report['held_out']} held-out training "
                     "records, chosen by the seed, and any --eval-dataset)")
    return "\n".join(lines)
