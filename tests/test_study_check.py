"""bench/study_check.py --small: the GPU study check's whole path on the tiny preset, so that it cannot break unseen."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KNOBS = ("MODEL", "DATA_DIR", "NPROC", "PARALLEL", "RUNS", "TRAIN_EXTRA", "EVAL_EXTRA", "PY", "SEEDS")
PEAK = 1e12  # a nominal peak FLOP/s for the CPU, so that MFU and the estimate exist; above any 2-core CPU


def records(name: str) -> int:
    info = json.loads((REPO / "data/demo/dataset_info.json").read_text(encoding="utf-8"))
    return len(json.loads((REPO / "data/demo" / info[name]["file_name"]).read_text(encoding="utf-8")))


@pytest.mark.slow
def test_the_study_check_resumes_bit_for_bit_and_its_estimate_adds_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}  # the check sets launch.sh's knobs itself
    done = subprocess.run([sys.executable, "bench/study_check.py", "--small", "--peak-tflops", "1",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "out/study_check.json").read_text(encoding="utf-8"))

    # row 17 stopped at its first checkpoint (every 2 steps, of 40), resumed, equal to the uninterrupted run
    assert r["resume"] == {"run": "17-lora-qkv-3-5", "stopped_at_step": r["resume"]["stopped_at_step"], "equal": True}
    assert 2 <= r["resume"]["stopped_at_step"] < 40
    assert "adapter equal, byte for byte, to the uninterrupted run's" in (tmp_path / "out/study_check.md").read_text()

    # every stage, with its figures
    assert r["model"]["preset"] == "tiny" and r["model"]["write_s"] > 0
    assert r["load_s"] > 0 and r["checkpoint_save_s"] > 0 and r["checkpoint_bytes"] > 0 and r["peak_memory_bytes"] > 0
    assert sorted(r["train"]) == ["17-lora-qkv-3-5", "9-ptuning"]
    for t in r["train"].values():
        assert t["tokens_per_s"] > 0 and t["tokens_per_sample"] > 0 and t["peak_memory_bytes"] > 0
        assert t["mfu"] == pytest.approx(t["flops_per_token"] * t["tokens_per_s"] / PEAK, rel=1e-12)
        assert 0 < t["mfu"] < 1
    assert sorted(r["eval"]) == sorted(f"{run} {s}" for run in ("0-base", "9-ptuning", "17-lora-qkv-3-5")
                                       for s in ("roleplay_all_test", "alpaca_gpt4_zh"))
    for e in r["eval"].values():
        assert e["n_samples"] == 4 and e["runtime_s"] > 0 and e["generation_tokens_per_s"] > 0
        assert e["s_per_sample"] == pytest.approx(e["runtime_s"] / 4)
        assert 0 <= e["nll_s"] <= e["runtime_s"]  # evaluate.py rounds to 10 ms: a tiny model's pass may show 0

    # the estimate, recomputed from the JSON's own numbers
    est = r["estimate"]
    train = list(r["train"].values())
    assert est["mfu"] == pytest.approx(sum(t["mfu"] for t in train) / 2, rel=1e-12)
    assert est["tokens_per_sample"] == round(sum(t["tokens_per_sample"] for t in train) / 2)
    assert est["eval_s_per_sample"] == pytest.approx(sum(e["s_per_sample"] for e in r["eval"].values()) / 6)
    assert est["measured_peak_flops"] == PEAK and est["load_s"] == r["load_s"]
    assert [row["id"] for row in est["rows"]] == list(range(1, 23))
    roleplay, aux = records("roleplay_all_train"), min(records("chat_aux_zh"), 10000)
    for row in est["rows"]:  # the study's command: 200 held out, 10 epochs; even ids add the auxiliary set
        assert row["samples"] == roleplay + (aux if row["id"] % 2 == 0 else 0) - 200 and row["epochs"] == 10
        assert row["tokens"] == row["samples"] * 10 * est["tokens_per_sample"] and row["flops"] > row["tokens"]
    assert est["flops"] == pytest.approx(sum(row["flops"] for row in est["rows"]), rel=1e-12)
    assert est["eval_samples"] == 23 * 2 * 100 and est["loads"] == 22 + 23
    assert sorted(est["targets"]) == ["1 x H100", "8 x A100"]
    for t, peak, gpus in ((est["targets"]["8 x A100"], 312e12, 8), (est["targets"]["1 x H100"], 989e12, 1)):
        assert t["peak_flops"] == peak and t["gpus"] == gpus
        assert t["train_s"] == pytest.approx(est["flops"] / (peak * est["mfu"]), rel=1e-12)
        assert t["eval_s"] == pytest.approx(4600 * est["eval_s_per_sample"] * PEAK / peak, rel=1e-12)
        assert t["load_s"] == pytest.approx(45 * r["load_s"], rel=1e-12)
        assert t["wall_s"] == pytest.approx((t["train_s"] + t["eval_s"] + t["load_s"]) / gpus, rel=1e-12)
