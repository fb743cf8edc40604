"""BLEU-4 and ROUGE-1/2/L exactly as the study computed them (see chatglm6b.md, "Metrics").

Per sample: ROUGE F-measures on jieba words, BLEU-4 on characters, each times 100 and rounded to
4 decimals as the study's `ComputeMetrics` did; the reported value is the mean over samples.
"""
import logging

import jieba
import nltk
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

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


def corpus_scores(predicts: list[str], labels: list[str]) -> dict[str, float]:
    """Mean of the per-sample scores; every metric is 0 for an empty list."""
    per_sample = [sample_scores(p, l) for p, l in zip(predicts, labels, strict=True)]
    return {k: float(np.mean([s[k] for s in per_sample])) if per_sample else 0.0 for k in METRICS}


def versions() -> dict[str, str]:
    """The libraries the numbers depend on (jieba's dictionary and nltk's smoothing changed across releases)."""
    from importlib.metadata import version

    return {"jieba": jieba.__version__, "rouge-chinese": version("rouge-chinese"), "nltk": nltk.__version__}
