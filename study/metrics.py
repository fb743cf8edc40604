"""BLEU-4 and ROUGE-1/2/L exactly as the study computed them (see chatglm6b.md, "Metrics"), and what
metrics.json says about one set of predictions beyond them.

Per sample: ROUGE F-measures on jieba words, BLEU-4 on characters, each times 100 and rounded to
4 decimals as the study's `ComputeMetrics` did; the reported value is the mean over samples. Every mean
comes with its bootstrap interval over samples (stats.py). Beside them: the teacher-forced NLL of the
reference answers (evaluate.py computes it per sample), empty predictions and prediction lengths.
"""
import logging
import math

import jieba
import nltk
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from .stats import bootstrap_interval, settings, weighted_mean

jieba.setLogLevel(logging.WARNING)  # jieba prints its dictionary loading on first use

# name (the key in metrics.json) -> title (tables, charts), in the order tables show them
TITLES = {"bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-l"}
METRICS = tuple(TITLES)
DEFINITION = (
    "per sample: rouge-1/2/l = F of rouge_chinese.Rouge().get_scores(' '.join(jieba.cut(predict)), "
    "' '.join(jieba.cut(label))) x 100, all three 0 when either jieba-split side has no word "
    "(the study's guard for an empty prediction; an empty label would make rouge raise); "
    "bleu-4 = nltk sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3) "
    "x 100 on characters; each rounded to 4 decimals; reported value = mean over samples"
)
NLL_DEFINITION = (
    "teacher-forced negative log-likelihood (natural log) of the reference answer under the training prompt and "
    "truncation (data.encode_train: max_source_length, max_target_length), the training loss's tokens (<sop>, the "
    "answer, <eop>); per sample: mean over its tokens; reported nll = mean over all tokens of the set "
    "(sum / count, as the training loss), ppl = exp(nll)"
)


def sample_scores(predict: str, label: str) -> dict[str, float]:
    """One (prediction, label) pair -> {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}, each in [0, 100]."""
    hypothesis = " ".join(jieba.cut(predict))
    reference = " ".join(jieba.cut(label))
    if hypothesis.split() and reference.split():
        rouge = Rouge().get_scores(hypothesis, reference)[0]
        scores = {k: round(rouge[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    else:  # rouge_chinese raises "Hypothesis is empty." / "Reference is empty." here
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return {k: scores[k] for k in METRICS}


def mean_scores(per_sample: list[dict]) -> dict[str, float]:
    """The reported value of each metric: the mean of the per-sample scores (0 without samples)."""
    return {k: float(np.mean([s[k] for s in per_sample])) if per_sample else 0.0 for k in METRICS}


def score_stats(rows: list[dict]) -> dict:
    """Per-sample rows (METRICS, and "nll" with "target_tokens" where the NLL pass ran) -> the reported means,
    nll and ppl (None without NLL), and their intervals: {"interval": {key: [low, high]}, "bootstrap": settings}."""
    out = mean_scores(rows)
    interval = {k: rounded(bootstrap_interval([r[k] for r in rows])) for k in METRICS} if rows else {}
    out["nll"] = out["ppl"] = None
    if rows and all("nll" in r for r in rows):
        nll, tokens = [r["nll"] for r in rows], [r["target_tokens"] for r in rows]
        out["nll"] = weighted_mean(nll, tokens)  # per token over the whole set
        out["ppl"] = math.exp(out["nll"])
        low, high = bootstrap_interval(nll, tokens)
        interval.update(nll=rounded((low, high)), ppl=rounded((math.exp(low), math.exp(high))))
    return {**out, "interval": interval, "bootstrap": settings()}


def prediction_stats(records: list[dict]) -> dict:
    """Empty answers, answers cut at the length cap, and answer lengths in characters and in generated ids
    ("new_tokens", <eop> included; None for predictions written before it was recorded)."""
    tokens = [r["new_tokens"] for r in records if "new_tokens" in r]
    return {"n_empty": sum(not r["predict"].strip() for r in records),
            "n_length_capped": sum(bool(r.get("hit_length_cap")) for r in records),
            "predict_length": {"chars": spread([len(r["predict"]) for r in records]),
                               "tokens": spread(tokens) if len(tokens) == len(records) else None}}


def spread(values: list[int]) -> dict | None:
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "max": int(max(values))} \
        if values else None


def rounded(interval) -> list[float]:
    return [round(float(v), 6) for v in interval]


def versions() -> dict[str, str]:
    """The libraries the numbers depend on (jieba's dictionary and nltk's smoothing changed across releases)."""
    from importlib.metadata import version

    return {"jieba": jieba.__version__, "rouge-chinese": version("rouge-chinese"), "nltk": nltk.__version__}
