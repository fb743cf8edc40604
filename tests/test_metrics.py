"""metrics.py against an independent computation written here with jieba + rouge_chinese + nltk,
and a few values that follow by hand from the definitions."""
import math

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from conftest import corpus_scores
from study.metrics import METRICS, sample_scores

PAIRS = [  # (prediction, label)
    ("本喵可以陪你去做饭，不过要先给本喵面条喵～", "本喵可以陪你去做饭，不过要先给本喵面条喵～"),
    ("本喵想去海边玩喵～", "本喵可以陪你去做饭，不过要先给本喵面条喵～"),
    ("美国的首都是华盛顿特区。", "美国的首都是华盛顿。"),
    ("", "美国的首都是华盛顿。"),  # empty prediction
    ("   \n ", "美国的首都是华盛顿。"),  # blank prediction: no jieba word
    ("。。。！！", "美国的首都是华盛顿。"),  # punctuation only
    ("？", "？"),
    ("The cat sat on the mat.", "The cat is sitting on the mat."),  # English: jieba keeps words, BLEU on chars
    ("Hello, world", "hello world"),
    ("我喜欢 machine learning 和深度学习", "我喜欢深度学习和 machine learning"),
    ("一二三四五六七八九十", "十九八七六五四三二一"),
    ("好的", "好的好的好的好的"),
]


def reference_scores(pred: str, label: str) -> dict:
    """The study's ComputeMetrics, written out again: F x 100 rounded to 4 decimals; empty -> 0."""
    hyp = list(jieba.cut(pred))
    ref = list(jieba.cut(label))
    if len(" ".join(hyp).split()) == 0 or len(" ".join(ref).split()) == 0:
        out = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        r = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        out = {k: round(v["f"] * 100, 4) for k, v in r.items()}
    out["bleu-4"] = round(sentence_bleu([list(label)], list(pred),
                                        smoothing_function=SmoothingFunction().method3) * 100, 4)
    return out


@pytest.mark.parametrize("pred,label", PAIRS)
def test_sample_scores_match_independent_computation(pred, label):
    got, want = sample_scores(pred, label), reference_scores(pred, label)
    assert set(got) == set(METRICS)
    for k in METRICS:
        assert math.isclose(got[k], want[k], abs_tol=1e-9), (k, got[k], want[k])


def test_corpus_scores_are_means_of_sample_scores():
    preds, labels = [p for p, _ in PAIRS], [l for _, l in PAIRS]
    got = corpus_scores(preds, labels)
    for k in METRICS:
        want = sum(reference_scores(p, l)[k] for p, l in PAIRS) / len(PAIRS)
        assert math.isclose(got[k], want, abs_tol=1e-9), (k, got[k], want)


def test_identical_strings_score_100():
    # >= 4 characters and >= 2 jieba words, so every n-gram order has a match
    assert sample_scores("今天天气很好，我们去公园散步吧", "今天天气很好，我们去公园散步吧") == \
        {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    assert sample_scores("the cat sat on the mat", "the cat sat on the mat") == \
        {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


def test_empty_and_blank_predictions_score_zero():
    zero = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert sample_scores("", "美国的首都是华盛顿。") == zero
    assert sample_scores(" \n\t ", "美国的首都是华盛顿。")["rouge-1"] == 0.0
    assert sample_scores("你好", "") == zero  # an empty label: rouge_chinese would raise "Reference is empty."
    assert corpus_scores([], []) == zero


def test_hand_computed_values():
    # one word each way (jieba: "你好"): unigram F = 1, no bigram; BLEU on chars "你好": p1 = p2 = 1,
    # p3, p4 have no n-grams and method3 gives them 1/2 and 1/4 -> (1 * 1 * 1/2 * 1/4) ** (1/4)
    s = sample_scores("你好", "你好")
    assert s["rouge-1"] == 100.0 and s["rouge-2"] == 0.0 and s["rouge-l"] == 100.0
    assert s["bleu-4"] == round((1 / 8) ** 0.25 * 100, 4)
    # no shared character, no shared word
    assert sample_scores("甲乙丙丁", "子丑寅卯") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    # unigram ROUGE of "a b" vs "a c": P = R = 1/2 -> F = 50
    assert sample_scores("a b", "a c")["rouge-1"] == 50.0
