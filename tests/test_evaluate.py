"""evaluate.py: the comparison table (intervals, comparisons with run 0), recomputing metrics, end-to-end
evaluation of the tiny preset, the NLL of the reference answers against the training loss, several seeds, resume,
1 vs 2 processes, and the errors raised before any generation starts."""
import errno
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from adapters import AdapterSpec, apply_adapter, save_adapter
from conftest import (REPO, build_train_samples, corpus_scores, greedy_answers, script_env, synthetic_rows,
                      torchrun_command, write_scored_run)
from data import DEMO_DIR, build_eval_samples, encode_train
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.generate import generate_ids
from model.loader import load_model
from model.loss import IGNORE, token_loss_sum
from model.tokenizer import load_tokenizer
from study import results
from study.fingerprint import code_files, code_fingerprint, run_needs
from study.metrics import METRICS, TITLES, sample_scores
from study.stats import bootstrap_interval, paired_difference


SETS = ("roleplay_all_test", "alpaca_gpt4_zh")
# small but every sample still generates: prompts of at most 40 tokens, answers up to 48 - prompt
TINY = ["--model", "tiny", "--max-samples", "4", "--max-length", "48", "--max-source-length", "40"]


def write_run(runs: Path, dirname: str, run: dict, metrics: dict | None, names=METRICS, code=None):
    """A launcher run directory with metrics made by `code` (default: this checkout's)."""
    d = runs / dirname
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": dirname, "commands": [], **run}))
    made_by = {"fingerprint": {"code": code or code_fingerprint()}}
    for name, values in (metrics or {}).items():
        (d / "eval" / name).mkdir(parents=True)
        (d / "eval" / name / "metrics.json").write_text(json.dumps({**dict(zip(names, values, strict=True)), **made_by}))


def three_runs(runs: Path):
    # directory names sort 0, 14, 9 as text: the table must sort by id as a number
    write_run(runs, "0-base", {"id": 0, "method": "none", "target": "-", "layers": "-", "aux": False},
              {"roleplay_all_test": [1.434, 11.93, 0.74, 8.78], "alpaca_gpt4_zh": [15.65, 34.41, 15.67, 26.2]})
    write_run(runs, "14-lora-mlp-0-2-aux", {"id": 14, "method": "lora", "target": "mlp", "layers": "0-2", "aux": True},
              {"roleplay_all_test": [2.82, 14.68, 1.1349, 12.16], "alpaca_gpt4_zh": [7.71, 29.21, 11.2, 22.01]})
    write_run(runs, "9-ptuning", {"id": 9, "method": "ptuning", "target": "-", "layers": "-", "aux": False},
              {"roleplay_all_test": [1.37, 11.89, 1.1312, 8.93], "alpaca_gpt4_zh": [16.37, 35.59, 15.95, 27.06]})
    (runs / "base-model").mkdir()  # no run.json: not a run (the demo's exported base model lives here)


# metrics.json written before intervals and the NLL existed: means only, '-' for the NLL columns
EXPECTED_TABLE = """\
| id | method | target | layers | aux | roleplay_all_test | - | - | - | - | - | - | alpaca_gpt4_zh | - | - | - | - | - | - |
| -- | ------ | ------ | ------ | --- | ----------------- | - | - | - | - | - | - | -------------- | - | - | - | - | - | - |
| - | - | - | - | - | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-l | NLL | ΔNLL | PPL | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-l | NLL | ΔNLL | PPL |
| 0 | none | - | - | no | 1.43 | 11.93 | 0.74 | 8.78 | - | - | - | 15.65 | 34.41 | 15.67 | 26.20 | - | - | - |
| 9 | ptuning | - | - | no | 1.37 | 11.89 | **1.13** | 8.93 | - | - | - | **16.37** | **35.59** | **15.95** | **27.06** | - | - | - |
| 14 | lora | mlp | 0-2 | yes | **2.82** | **14.68** | **1.13** | **12.16** | - | - | - | 7.71 | 29.21 | 11.20 | 22.01 | - | - | - |

""" + results.LEGEND


def test_the_code_fingerprint_covers_the_scripts_and_the_packages():
    """Derived from the folders: a module added to a package counts at once; benchmarks, tests and the demo data's
    generator do not."""
    files = {f.relative_to(REPO).as_posix() for f in code_files(REPO)}
    assert {"train.py", "evaluate.py", "model/chatglm.py", "model/loss.py", "adapters/lora.py", "data/encode.py",
            "runtime/checkpoint.py", "runtime/precision.py", "study/grid.py", "study/metrics.py"} <= files
    assert not any(f.startswith(("bench/", "tests/", "scripts/", "data/demo/")) for f in files)
    assert all(f.count("/") <= 1 for f in files)


def test_a_change_of_the_model_code_marks_earlier_rows(tmp_path):
    """Rows whose scores were made by the code of a checkout are marked once that checkout's model code changes."""
    checkout = tmp_path / "checkout"
    for f in code_files(REPO):
        (checkout / f.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        (checkout / f.relative_to(REPO)).write_bytes(f.read_bytes())
    before = code_fingerprint(checkout)
    assert before == code_fingerprint(REPO)  # the same files give the same fingerprint
    runs = tmp_path / "runs"
    write_run(runs, "0-base", {"id": 0, "method": "none", "target": "-", "layers": "-", "aux": False},
              {s: [1.0, 2.0, 3.0, 4.0] for s in SETS}, code=before)
    assert [r["other_code"] for r in results.read_runs(runs, list(SETS), before)] == [False]
    assert "0†" not in results.markdown_table(results.read_runs(runs, list(SETS), before), list(SETS), 1)
    chatglm = checkout / "model" / "chatglm.py"
    chatglm.write_text(chatglm.read_text(encoding="utf-8").replace("sqrt", "sqrt ", 1), encoding="utf-8")
    after = code_fingerprint(checkout)
    assert after != before
    marked = results.read_runs(runs, list(SETS), after)
    assert [r["other_code"] for r in marked] == [True]
    table = results.markdown_table(marked, list(SETS), 1)
    assert "| 0† | none |" in table and "--rerun-stale" in table


def test_table_of_three_runs(tmp_path, capsys):
    three_runs(tmp_path)
    evaluate.main(["--runs", str(tmp_path)])
    assert capsys.readouterr().out == EXPECTED_TABLE
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == EXPECTED_TABLE
    rows = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()
    compared = [f"{{}}/{k}{c}" for k in (*METRICS, "nll") for c in ("", "/low", "/high", "/vs_base", "/vs_base_low",
                                                                    "/vs_base_high")]
    columns = compared + ["{}/ppl", "{}/ppl/low", "{}/ppl/high"]
    assert rows[0] == "id,name,method,target,layers,aux,other_code," + ",".join(c.format(s) for s in SETS
                                                                              for c in columns)
    base = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    means = {f"{s}/{m}": v for s, values in zip(SETS, [["1.434", "11.93", "0.74", "8.78"],
                                                       ["15.65", "34.41", "15.67", "26.2"]]) for m, v in zip(METRICS, values)}
    assert list(base.values())[:7] == ["0", "0-base", "none", "-", "-", "False", "False"]
    assert {k: v for k, v in base.items() if "/" in k} == {k: means.get(k, "") for k in base if "/" in k}
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "9", "14"]
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_table_intervals_and_comparisons_with_run_0(tmp_path, capsys):
    """Run 1 is better than run 0 on every role-play sample (and forgot: its NLL rose), and has run 0's very scores on
    alpaca; run 2 was scored on other samples. Table, CSV and chart show intervals and mark only run 1's role-play."""
    base = synthetic_rows(100, 0)
    rng = np.random.default_rng(1)
    better = [{**r, **{k: min(100.0, r[k] + 4 + rng.normal(0, 2)) for k in METRICS},
               "nll": r["nll"] + 0.3 + rng.normal(0, 0.1)} for r in base]
    elsewhere = [{**r, "index": r["index"] + 1000} for r in better]
    row = {"method": "lora", "target": "qkv", "layers": "3-5", "aux": False}
    write_scored_run(tmp_path, "0-base", {"id": 0, "method": "none", "target": "-", "layers": "-", "aux": False},
                     {s: base for s in SETS})
    write_scored_run(tmp_path, "1-lora", {"id": 1, **row}, {"roleplay_all_test": better, "alpaca_gpt4_zh": base})
    write_scored_run(tmp_path, "2-lora", {"id": 2, **row}, {s: elsewhere for s in SETS})
    evaluate.main(["--runs", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    cells = [[c.strip() for c in line.strip("| ").split(" | ")] for line in lines[3:6]]  # runs 0, 1, 2
    m = json.loads((tmp_path / "1-lora" / "eval" / "roleplay_all_test" / "metrics.json").read_text())
    for i, k in enumerate(METRICS):
        low, high = m["interval"][k]
        assert low < m[k] < high
        assert cells[1][5 + i] == f"**{m[k]:.2f} ±{(high - low) / 2:.2f}** ▲"  # best, and above run 0
    low, high = m["interval"]["nll"]
    assert cells[1][9] == f"{m['nll']:.3f} ±{(high - low) / 2:.3f}"  # higher than run 0's: not bold
    assert cells[0][9].startswith("**") and cells[0][10] == "-"  # run 0 has the lowest NLL; no change from itself
    tokens = [r["target_tokens"] for r in base]
    diff, low, high = paired_difference([r["nll"] for r in base], [r["nll"] for r in better], tokens)
    assert cells[1][10] == f"{diff:+.3f} ±{(high - low) / 2:.3f} ▲" and low > 0.2
    assert cells[1][11] == f"{m['ppl']:.2f} ±{(m['interval']['ppl'][1] - m['interval']['ppl'][0]) / 2:.2f}"
    assert cells[1][17] == "+0.000 ±0.000"  # alpaca: run 0's own scores
    assert not any("▲" in c or "▼" in c for c in cells[0] + cells[1][12:] + cells[2])
    assert cells[2][10] == cells[2][17] == "-"  # other samples: no paired comparison
    assert "▲ / ▼: higher / lower than run 0" in lines[7 + 1]

    csv_rows = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()
    one = dict(zip(csv_rows[0].split(","), csv_rows[2].split(","), strict=True))
    for k in METRICS:
        assert float(one[f"roleplay_all_test/{k}/low"]) < float(one[f"roleplay_all_test/{k}"]) < \
            float(one[f"roleplay_all_test/{k}/high"])
        assert 0 < float(one[f"roleplay_all_test/{k}/vs_base_low"]) < float(one[f"roleplay_all_test/{k}/vs_base"])
        assert float(one[f"alpaca_gpt4_zh/{k}/vs_base"]) == 0.0
    assert float(one["roleplay_all_test/nll/vs_base"]) == pytest.approx(diff, abs=1e-6)
    assert float(one["roleplay_all_test/ppl/high"]) == m["interval"]["ppl"][1]

    grid = results.chart_grid(results.read_runs(tmp_path, list(SETS)), list(SETS))
    assert grid["labels"] == [f"{s}\n{t}" for s in SETS for t in (*TITLES.values(), "NLL")]
    assert grid["hatched"].tolist() == [[False] * 10, [False] * 5 + [True] * 5, [False] * 10]
    low, high = m["interval"]["rouge-l"]
    assert grid["values"][1, 3] == m["rouge-l"] and grid["half"][1, 3] == pytest.approx((high - low) / 2)
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_rows_with_several_seeds_are_pooled(tmp_path):
    """launch.sh SEEDS=3 leaves three run directories of one id: the table has one row, the mean over the seeds with
    the sd of their means and the interval of the per-sample averages."""
    row = {"id": 17, "method": "lora", "target": "qkv", "layers": "3-5", "aux": False}
    seeds = {42: synthetic_rows(60, 1), 43: synthetic_rows(60, 2), 44: synthetic_rows(60, 3)}
    for seed, rows in seeds.items():
        write_scored_run(tmp_path, f"17-lora-qkv-3-5{'' if seed == 42 else f'-seed{seed}'}", {**row, "seed": seed},
                         {s: rows for s in SETS})
    (run,) = results.read_runs(tmp_path, list(SETS))
    assert run["seeds"] == [42, 43, 44]
    m = run["metrics"]["roleplay_all_test"]
    per_seed = {k: [np.mean([r[k] for r in rows]) for rows in seeds.values()] for k in METRICS}
    for k in METRICS:
        assert m[k] == pytest.approx(np.mean(per_seed[k]), abs=1e-9)
        assert m["seeds"]["sd"][k] == pytest.approx(np.std(per_seed[k], ddof=1), abs=1e-9)
        low, high = m["interval"][k]
        assert low < m[k] < high and high - low < 3 * np.std(per_seed[k], ddof=1) + 20
    tokens = [r["target_tokens"] for r in seeds[42]]
    averaged = [np.mean([rows[i]["nll"] for rows in seeds.values()]) for i in range(60)]
    assert m["nll"] == pytest.approx(np.dot(averaged, tokens) / sum(tokens), abs=1e-9)
    table = results.markdown_table([run], list(SETS), 1)
    bleu = table.splitlines()[3].split(" | ")[5]
    assert bleu.startswith(f"**{m['bleu-4']:.2f} ±") and f" sd {m['seeds']['sd']['bleu-4']:.2f}" in bleu


def test_table_bold_top_and_missing_metrics(tmp_path, capsys):
    three_runs(tmp_path)
    write_run(tmp_path, "17-lora-qkv", {"id": 17, "method": "lora", "target": "qkv", "layers": "3-5", "aux": False},
              {"roleplay_all_test": [3.0, 1.0, 0.5, 2.0]})
    evaluate.main(["--runs", str(tmp_path), "--bold-top", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[3] == ("| 0 | none | - | - | no | 1.43 | **11.93** | **0.74** | 8.78 | - | - | - | "
                      "**15.65** | **34.41** | **15.67** | **26.20** | - | - | - |")
    assert out[6] == ("| 17 | lora | qkv | 3-5 | no | **3.00** | 1.00 | 0.50 | 2.00 | - | - | - | "
                      "- | - | - | - | - | - | - |")
    assert out[-1].startswith("missing: run 17 ") and out[-1].count("alpaca_gpt4_zh") == 1


def test_table_follows_the_metric_list(tmp_path, monkeypatch, capsys):
    """A fifth metric in metrics.py (name and title) gives every set a fifth column in the table, CSV and chart."""
    titles = {**TITLES, "chrf": "chrF"}
    monkeypatch.setattr(results, "TITLES", titles)
    monkeypatch.setattr(results, "METRICS", tuple(titles))
    write_run(tmp_path, "0-base", {"id": 0, "method": "none", "target": "-", "layers": "-", "aux": False},
              {"roleplay_all_test": [1, 2, 3, 4, 50], "alpaca_gpt4_zh": [5, 6, 7, 8, 40]}, names=titles)
    write_run(tmp_path, "1-lora", {"id": 1, "method": "lora", "target": "qkv", "layers": "3", "aux": False},
              {"roleplay_all_test": [2, 1, 3, 5, 45]}, names=titles)
    evaluate.main(["--runs", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[:5] == [
        "| id | method | target | layers | aux | roleplay_all_test | - | - | - | - | - | - | - | "
        "alpaca_gpt4_zh | - | - | - | - | - | - | - |",
        "| -- | ------ | ------ | ------ | --- | ----------------- | - | - | - | - | - | - | - | "
        "-------------- | - | - | - | - | - | - | - |",
        "| - | - | - | - | - | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-l | chrF | NLL | ΔNLL | PPL | "
        "BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-l | chrF | NLL | ΔNLL | PPL |",
        "| 0 | none | - | - | no | 1.00 | **2.00** | **3.00** | 4.00 | **50.00** | - | - | - | "
        "**5.00** | **6.00** | **7.00** | **8.00** | **40.00** | - | - | - |",
        "| 1 | lora | qkv | 3 | no | **2.00** | 1.00 | **3.00** | **5.00** | 45.00 | - | - | - | "
        "- | - | - | - | - | - | - | - |"]
    csv_rows = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()
    assert ",roleplay_all_test/rouge-l/vs_base_high,roleplay_all_test/chrf,roleplay_all_test/chrf/low," in csv_rows[0]
    assert csv_rows[0].endswith(",alpaca_gpt4_zh/chrf/vs_base_high,alpaca_gpt4_zh/nll,alpaca_gpt4_zh/nll/low,"
                                "alpaca_gpt4_zh/nll/high,alpaca_gpt4_zh/nll/vs_base,alpaca_gpt4_zh/nll/vs_base_low,"
                                "alpaca_gpt4_zh/nll/vs_base_high,alpaca_gpt4_zh/ppl,alpaca_gpt4_zh/ppl/low,"
                                "alpaca_gpt4_zh/ppl/high")
    assert csv_rows[2].split(",")[7::6][:5] == ["2", "1", "3", "5", "45"]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results.chart_grid(results.read_runs(tmp_path, list(SETS)), list(SETS))["labels"][4] == \
        "roleplay_all_test\nchrF"


def test_generation_settings_record_is_what_metrics_json_keeps():
    gen = evaluate.parse_args(["--model", "tiny", "--greedy", "--seed", "7"]).gen
    assert gen.batch_size == 32
    assert list(gen.record().items()) == [("do_sample", False), ("top_p", 0.7), ("temperature", 0.95),
                                          ("max_length", 768), ("seed", 7), ("max_source_length", 512),
                                          ("source_prefix", "")]


def test_from_predictions_recomputes(tmp_path, capsys):
    records = [{"index": 0, "prompt": "p", "label": "美国的首都是华盛顿。", "predict": "美国的首都是华盛顿特区。",
                "hit_length_cap": False},
               {"index": 1, "prompt": "p", "label": "本喵可以陪你去做饭喵～", "predict": "", "hit_length_cap": True}]
    f = tmp_path / "generated_predictions.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "metrics.json").write_text(json.dumps({"dataset": "alpaca_gpt4_zh", "bleu-4": -1.0,
                                                       "generation": {"seed": 7}}))
    # the NLL of each reference comes from the model: kept from the previous scores.jsonl, the rest recomputed
    (tmp_path / "scores.jsonl").write_text(json.dumps({"index": 0, "bleu-4": -1.0, "nll": 2.0, "target_tokens": 3}) +
                                           "\n" + json.dumps({"index": 1, "nll": 4.0, "target_tokens": 1}) + "\n")
    evaluate.main(["--from-predictions", str(f)])
    got = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    want = corpus_scores([r["predict"] for r in records], [r["label"] for r in records])
    assert {k: got[k] for k in METRICS} == want and want["bleu-4"] > 0
    assert got["n_samples"] == 2 and got["n_length_capped"] == 1 and got["n_empty"] == 1
    assert got["nll"] == pytest.approx((2.0 * 3 + 4.0) / 4) and got["predict_length"]["tokens"] is None
    rows = read_predictions(tmp_path / "scores.jsonl")
    assert rows[0] == {"index": 0, **sample_scores(records[0]["predict"], records[0]["label"]), "nll": 2.0,
                       "target_tokens": 3}
    assert got["generation"] == {"seed": 7} and got["dataset"] == "alpaca_gpt4_zh"  # kept from the old file
    assert json.loads(capsys.readouterr().out)["rouge-1"] == want["rouge-1"]


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_end_to_end_tiny(tmp_path):
    evaluate.main(TINY + ["--greedy", "--batch-size", "3", "--output-dir", str(tmp_path)])
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny").eval()
    for name in SETS:
        preds = read_predictions(tmp_path / name / "generated_predictions.jsonl")
        samples = build_eval_samples(tokenizer, name, DEMO_DIR, 4, max_source_length=40)
        assert [p["index"] for p in preds] == [0, 1, 2, 3]
        assert [(p["prompt"], p["label"]) for p in preds] == [(s["prompt"], s["label"]) for s in samples]
        # each answer equals the sample generated alone with its own cap: batching changes nothing
        lengths = []
        for p, s in zip(preds, samples):
            cap = 48 - len(s["input_ids"])
            row = generate_ids(model, [s["input_ids"]], max_new_tokens=cap)[0]
            ended = row[-1] == tokenizer.eop_id
            text = tokenizer.decode(row, skip_special_tokens=True)
            assert (p["predict"], p["hit_length_cap"], p["new_tokens"]) == (text, not ended, len(row))
            lengths.append(len(row))
        metrics = json.loads((tmp_path / name / "metrics.json").read_text(encoding="utf-8"))
        want = corpus_scores([p["predict"] for p in preds], [p["label"] for p in preds])
        assert {k: metrics[k] for k in METRICS} == want  # the study's means, exactly
        assert metrics["n_samples"] == 4 and metrics["n_length_capped"] == sum(p["hit_length_cap"] for p in preds)
        # per-sample scores beside the predictions, and the interval of each mean
        rows = read_predictions(tmp_path / name / "scores.jsonl")
        assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["target_tokens"] > 1 for r in rows)
        assert [{k: r[k] for k in METRICS} for r in rows] == [sample_scores(p["predict"], p["label"]) for p in preds]
        assert metrics["bootstrap"] == {"method": "percentile", "resamples": 2000, "seed": 0, "level": 0.95,
                                        "unit": "sample"}
        for k in METRICS:
            assert metrics["interval"][k] == pytest.approx(bootstrap_interval([r[k] for r in rows]), abs=1e-6)
            assert metrics["interval"][k][0] <= metrics[k] <= metrics["interval"][k][1]
        tokens = [r["target_tokens"] for r in rows]
        assert metrics["nll"] == pytest.approx(sum(r["nll"] * n for r, n in zip(rows, tokens)) / sum(tokens))
        assert metrics["interval"]["ppl"] == pytest.approx([math.exp(v) for v in metrics["interval"]["nll"]])
        assert metrics["reference_nll"]["max_source_length"] == 40
        assert metrics["reference_nll"]["max_target_length"] == 512
        # empty answers, lengths and speed
        assert metrics["n_empty"] == sum(not p["predict"].strip() for p in preds)
        chars = [len(p["predict"]) for p in preds]
        assert metrics["predict_length"] == {
            "chars": {"mean": np.mean(chars), "median": np.median(chars), "max": max(chars)},
            "tokens": {"mean": np.mean(lengths), "median": np.median(lengths), "max": max(lengths)}}
        assert metrics["generated_tokens"] == sum(lengths) and metrics["generation_tokens_per_s"] > 0
        assert metrics["generation"]["do_sample"] is False and metrics["generation"]["max_length"] == 48
        assert metrics["model"]["path"] == "tiny" and metrics["adapter"] is None
        assert set(metrics["versions"]) == {"jieba", "rouge-chinese", "nltk"}
        assert not list((tmp_path / name).glob("*partial*"))


def test_reference_nll_is_the_training_loss(tmp_path):
    """The NLL of the reference answers equals a computation from the model's logits, sample by sample, and train.py's
    loss on one batch of the same records; prompts cut at --max-source-length and answers at --max-target-length."""
    evaluate.main(TINY + ["--dataset", "roleplay_all_test", "--max-target-length", "6", "--greedy", "--batch-size", "3",
                          "--output-dir", str(tmp_path)])
    metrics = json.loads((tmp_path / "roleplay_all_test" / "metrics.json").read_text(encoding="utf-8"))
    rows = read_predictions(tmp_path / "roleplay_all_test" / "scores.jsonl")
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny").eval()
    for row, s in zip(rows, build_eval_samples(tokenizer, "roleplay_all_test", DEMO_DIR, 4, max_source_length=40),
                      strict=True):
        ids, labels, _ = encode_train(tokenizer, s["prompt"], s["label"], 40, 6)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1].double()  # (T - 1, V): position t predicts token t + 1
        target = torch.tensor(labels[1:])
        scored = target != IGNORE
        nll = -logits[scored].log_softmax(-1).gather(1, target[scored, None]).mean().item()
        assert row["target_tokens"] == int(scored.sum()) and abs(row["nll"] - nll) <= 1e-5

    samples, report = build_train_samples(tokenizer, ["roleplay_all_test"], DEMO_DIR, 4, max_source_length=40,
                                          max_target_length=6)
    data = train.TrainData(samples, tokenizer.pad_id, global_batch=4, grad_accum=1, seed=0)
    [(batch, weight)], n_targets, _ = data.step_batches(0, rank=0, world=1)  # one batch of all four records
    with torch.no_grad():
        loss = token_loss_sum(model, batch, torch.device("cpu")).item() * weight  # weight = 1 / label tokens
    assert abs(metrics["nll"] - loss) <= 1e-5 and n_targets == sum(r["target_tokens"] for r in rows)
    assert metrics["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["reference_nll"]["truncated"] == report["truncated"] == 2  # a long prompt, a long answer


def test_length_sorted_batches_limit_samples_and_tokens():
    samples = [{"index": i, "input_ids": [0] * n} for i, n in enumerate([5, 30, 12, 30, 7, 20, 3])]
    plain = evaluate.length_sorted_batches(samples, 3)  # generation: --batch-size prompts
    assert [[s["index"] for s in b] for b in plain] == [[1, 3, 5], [2, 4, 0], [6]]
    capped = evaluate.length_sorted_batches(samples, 3, max_tokens=60)  # the NLL pass: also <= 60 padded tokens
    assert [[s["index"] for s in b] for b in capped] == [[1, 3], [5, 2, 4], [0, 6]]
    assert [[s["index"] for s in b] for b in evaluate.length_sorted_batches(samples, 3, max_tokens=10)] == \
        [[1], [3], [5], [2], [4], [0, 6]]  # one sample longer than the budget still makes a batch


def test_several_seeds(tmp_path, capsys):
    """--seeds: per seed what --seed writes, and a summary: the mean and sd over seeds, the pooled interval."""
    name, args = "alpaca_gpt4_zh", TINY + ["--dataset", "alpaca_gpt4_zh", "--max-samples", "3"]
    evaluate.main(args + ["--seeds", "42,7", "--output-dir", str(tmp_path / "seeds")])
    evaluate.main(args + ["--seed", "7", "--output-dir", str(tmp_path / "one")])
    assert (tmp_path / "seeds" / "seed-7" / name / "generated_predictions.jsonl").read_text(encoding="utf-8") == \
        (tmp_path / "one" / name / "generated_predictions.jsonl").read_text(encoding="utf-8")
    per_seed = {s: json.loads((tmp_path / "seeds" / f"seed-{s}" / name / "metrics.json").read_text()) for s in (42, 7)}
    rows = {s: read_predictions(tmp_path / "seeds" / f"seed-{s}" / name / "scores.jsonl") for s in (42, 7)}
    assert rows[42] != rows[7]  # sampling with other seeds gave other answers
    summary = json.loads((tmp_path / "seeds" / name / "metrics.json").read_text(encoding="utf-8"))
    pooled = read_predictions(tmp_path / "seeds" / name / "scores.jsonl")
    assert summary["seeds"]["values"] == summary["generation"]["seed"] == [42, 7]
    assert summary["seeds"]["dirs"] == [f"seed-42/{name}", f"seed-7/{name}"]
    for k in METRICS:
        values = [per_seed[42][k], per_seed[7][k]]
        assert summary["seeds"]["mean"][k] == pytest.approx(np.mean(values)) == summary[k]
        assert summary["seeds"]["sd"][k] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        average = [(a[k] + b[k]) / 2 for a, b in zip(rows[42], rows[7])]  # each sample's score over the seeds
        assert [r[k] for r in pooled] == pytest.approx(average)
        assert summary["interval"][k] == pytest.approx(bootstrap_interval(average), abs=1e-6)
    assert summary["nll"] == per_seed[42]["nll"] == per_seed[7]["nll"]  # teacher forcing does not sample
    assert summary["n_samples"] == 3 and summary["n_empty"] == per_seed[42]["n_empty"] + per_seed[7]["n_empty"]
    assert summary["generated_tokens"] == per_seed[42]["generated_tokens"] + per_seed[7]["generated_tokens"]
    assert f"{name} over seeds 42,7: " in capsys.readouterr().out
    for bad, message in ((["--seeds", "1,2", "--greedy"], "--seeds with --greedy"), (["--seeds", "1,1"], "twice")):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(["--model", "tiny", *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_does_not_redo_written_predictions(tmp_path, monkeypatch):
    args = TINY + ["--dataset", "alpaca_gpt4_zh", "--batch-size", "2"]
    calls = []

    def interrupted(model, prompts, **kw):
        if calls:
            raise RuntimeError("killed")
        calls.append(len(prompts))
        return generate_ids(model, prompts, **kw)

    monkeypatch.setattr(evaluate, "generate_ids", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate.main(args + ["--output-dir", str(tmp_path / "run")])
    partial = list((tmp_path / "run" / "alpaca_gpt4_zh").glob("generated_predictions.partial-*.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 2

    def counting(model, prompts, **kw):
        calls.append(len(prompts))
        return generate_ids(model, prompts, **kw)

    calls.clear()
    monkeypatch.setattr(evaluate, "generate_ids", counting)
    evaluate.main(args + ["--output-dir", str(tmp_path / "run")])
    assert calls == [2]  # only the two samples the interrupted run had not written
    evaluate.main(args + ["--output-dir", str(tmp_path / "fresh")])
    assert calls == [2, 2, 2]
    resumed = (tmp_path / "run" / "alpaca_gpt4_zh" / "generated_predictions.jsonl").read_text(encoding="utf-8")
    fresh = (tmp_path / "fresh" / "alpaca_gpt4_zh" / "generated_predictions.jsonl").read_text(encoding="utf-8")
    assert resumed == fresh
    assert not list((tmp_path / "run" / "alpaca_gpt4_zh").glob("*partial*"))


def test_a_full_disk_mid_record_then_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """A disk that fills while a batch is appended leaves its last record cut short, in the middle of a character;
    the same command drops that record with one line, generates it again, and ends with what an uninterrupted
    evaluation writes."""
    args = TINY + ["--dataset", "roleplay_all_test", "--batch-size", "2", "--output-dir"]
    real = evaluate.append_jsonl

    def disk_fills(path, rows):
        if Path(path).exists():  # the second batch: half of its bytes reach the disk
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            with open(path, "ab") as f:
                f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, rows)

    monkeypatch.setattr(evaluate, "append_jsonl", disk_fills)
    with pytest.raises(SystemExit) as e:
        evaluate.main(args + [str(tmp_path / "run")])
    assert e.value.code == 1 and "disk is full" in capsys.readouterr().err
    (partial,) = (tmp_path / "run" / "roleplay_all_test").glob("generated_predictions.partial-*.jsonl")
    with pytest.raises(UnicodeDecodeError):
        partial.read_bytes().decode("utf-8")  # cut in the middle of a character
    monkeypatch.setattr(evaluate, "append_jsonl", real)
    evaluate.main(args + [str(tmp_path / "run")])
    assert capsys.readouterr().out.count("dropped its last record, which an interrupted write left unfinished") == 1
    evaluate.main(args + [str(tmp_path / "fresh")])
    written = [(tmp_path / d / "roleplay_all_test" / "generated_predictions.jsonl").read_text(encoding="utf-8")
               for d in ("run", "fresh")]
    assert written[0] == written[1] and len(written[0].splitlines()) == 4


def test_a_damaged_metrics_file_is_named_and_the_other_rows_stay(tmp_path, capsys):
    for i, scores in ((0, [1.0, 2.0, 3.0, 4.0]), (1, [5.0, 6.0, 7.0, 8.0]), (2, [2.0, 2.0, 2.0, 2.0])):
        write_run(tmp_path, f"{i}-run", {"id": i, "method": "lora" if i else "none", "target": "-", "layers": "-",
                                          "aux": False}, {s: scores for s in SETS})
    bad = tmp_path / "1-run" / "eval" / "alpaca_gpt4_zh" / "metrics.json"
    bad.write_text(bad.read_text().replace('"bleu-4": 5.0', '"bleu-4": "abc"'))
    cut = tmp_path / "2-run" / "eval" / "roleplay_all_test" / "metrics.json"
    cut.write_text(cut.read_text()[:20])
    evaluate.main(["--runs", str(tmp_path), "--dataset", ",".join(SETS)])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0]: [c.strip("*") for c in line.split(" | ")]  # unbolded
            for line in out.splitlines() if line.startswith("| ")}
    assert rows["| 0"][5:9] == ["1.00", "2.00", "3.00", "4.00"]
    assert rows["| 1"][5:9] == ["5.00", "6.00", "7.00", "8.00"] and rows["| 1"][12:16] == ["?"] * 4
    assert rows["| 2"][5:9] == ["?"] * 4 and rows["| 2"][12:16] == ["2.00"] * 4
    assert f"? run 1: {bad}: bleu-4: not a number" in out
    assert f"? run 2: {cut}: not a metrics.json that evaluate.py writes" in out
    assert "missing:" not in out


def test_a_damaged_metrics_file_is_evaluated_again(tmp_path):
    write_run(tmp_path, "0-base", {"id": 0, "method": "none", "target": "-", "layers": "-", "aux": False},
              {s: [1.0, 2.0, 3.0, 4.0] for s in SETS})
    assert run_needs(tmp_path / "0-base") == "done"
    metrics = tmp_path / "0-base" / "eval" / SETS[1] / "metrics.json"
    metrics.write_text(metrics.read_text()[:-5])
    assert run_needs(tmp_path / "0-base") == "eval"


@pytest.mark.slow
def test_one_vs_two_processes_identical(tmp_path):
    """Sampling (the study's default) with 5 samples in batches of 2: ranks get uneven shares."""
    args = TINY[:3] + ["5"] + TINY[4:] + ["--batch-size", "2"]
    one = subprocess.run([sys.executable, "evaluate.py", *args, "--output-dir", str(tmp_path / "one")],
                         cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(torchrun_command(2, "evaluate.py", *args, "--output-dir", tmp_path / "two"),
                         cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    for name in SETS:
        a = (tmp_path / "one" / name / "generated_predictions.jsonl").read_text(encoding="utf-8")
        b = (tmp_path / "two" / name / "generated_predictions.jsonl").read_text(encoding="utf-8")
        assert a == b and len(a.splitlines()) == 5
        ma = json.loads((tmp_path / "one" / name / "metrics.json").read_text(encoding="utf-8"))
        mb = json.loads((tmp_path / "two" / name / "metrics.json").read_text(encoding="utf-8"))
        assert {k: ma[k] for k in (*METRICS, "nll")} == {k: mb[k] for k in (*METRICS, "nll")}
        assert ma["interval"] == mb["interval"]
        assert (ma["generation"]["world_size"], mb["generation"]["world_size"]) == (1, 2)
        assert ma["generation"]["do_sample"] is True


def test_adapter_for_another_base_model_fails_before_generation(tmp_path, monkeypatch, capsys):
    other = ChatGLMConfig.from_name("tiny")
    other.num_layers = 4
    model = ChatGLMModel(other).init_weights(0)
    spec = AdapterSpec(method="lora", target="qkv", layers=[1, 2, 3])
    apply_adapter(model, spec)
    save_adapter(model, spec, tmp_path / "adapter")
    monkeypatch.setattr(evaluate, "generate_ids", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(TINY + ["--checkpoint", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "adapter made for base" in err and "4 layers" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_fails_before_generation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "generate_ids", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(TINY + ["--dataset", "alpaca_gpt4_zh,no_such_set", "--output-dir", str(tmp_path)])
    assert e.value.code == 2 and "unknown dataset 'no_such_set'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_table_evaluates_missing_runs_with_model(tmp_path, capsys):
    write_run(tmp_path, "0-base", {"id": 0, "method": "none", "target": "-", "layers": "-", "aux": False}, None)
    evaluate.main(["--runs", str(tmp_path), "--dataset", "alpaca_gpt4_zh", "--greedy"] + TINY)
    metrics = json.loads((tmp_path / "0-base" / "eval" / "alpaca_gpt4_zh" / "metrics.json").read_text())
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 "))
    low, high = zip(*(metrics["interval"][k] for k in (*METRICS, "nll", "ppl")))
    assert row == ("| 0 | none | - | - | no | " +
                   " | ".join(f"**{metrics[k]:.2f} ±{(high[i] - low[i]) / 2:.2f}**" for i, k in enumerate(METRICS)) +
                   f" | **{metrics['nll']:.3f} ±{(high[4] - low[4]) / 2:.3f}** | - | "
                   f"**{metrics['ppl']:.2f} ±{(high[5] - low[5]) / 2:.2f}** |")


def test_chat_keeps_history(monkeypatch, capsys):
    tokenizer = load_tokenizer("tiny")
    first_piece = tokenizer.encode("好的", add_special_tokens=False)[0]
    answer = tokenizer.decode([first_piece])
    prompts = []

    def fake(model, prompt_ids, **kw):
        prompts.append(tokenizer.decode(prompt_ids[0][:-2]))  # without [gMASK] <sop>
        return [[first_piece, tokenizer.eop_id]]

    monkeypatch.setattr(evaluate, "generate_ids", fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n再见\nclear\n嗨\nexit\n不会读到\n"))
    evaluate.main(["--chat", "--model", "tiny", "--greedy"])
    assert prompts == ["你好", f"[Round 0]\n问：你好\n答：{answer}\n[Round 1]\n问：再见\n答：", "嗨"]
    assert capsys.readouterr().out.count(f"ChatGLM: {answer}") == 3


@pytest.mark.parametrize("method", ["lora", "ptuning", "freeze"])
def test_checkpoint_is_applied(tmp_path, method):
    """Predictions with --checkpoint equal the adapted model's own generations (LoRA: merged vs not merged),
    and differ from the base model's."""
    model = load_model("tiny")
    spec = AdapterSpec(method=method, target="qkv", layers=[3, 4, 5], lora_rank=4, pre_seq_len=4)
    apply_adapter(model, spec)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (5.0 if method == "ptuning" else 0.5))
    save_adapter(model, spec, tmp_path / "run")
    args = TINY + ["--dataset", "alpaca_gpt4_zh", "--max-samples", "3", "--greedy"]
    evaluate.main(args + ["--checkpoint", str(tmp_path / "run")])
    evaluate.main(args + ["--output-dir", str(tmp_path / "base")])
    tuned = read_predictions(tmp_path / "run" / "eval" / "alpaca_gpt4_zh" / "generated_predictions.jsonl")
    base = read_predictions(tmp_path / "base" / "alpaca_gpt4_zh" / "generated_predictions.jsonl")
    model.eval()
    assert [p["predict"] for p in tuned] == greedy_answers(model, load_tokenizer("tiny"), "alpaca_gpt4_zh", 3,
                                                           max_length=48, max_source_length=40)
    assert [p["predict"] for p in tuned] != [p["predict"] for p in base]
    metrics = json.loads((tmp_path / "run" / "eval" / "alpaca_gpt4_zh" / "metrics.json").read_text())
    assert metrics["adapter"]["settings"]["method"] == method
    assert "adapter_model.safetensors" in metrics["adapter"]["sha256"]
