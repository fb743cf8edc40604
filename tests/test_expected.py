"""The demo's numbers on any machine: the committed base model and its record, the README's table against
data/demo/expected.json, and `python -m study compare` saying equal / within the measured spread / outside it."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from study import demo_base, expected
from study.grid import DEMO_BASE, DEMO_BASE_TRAIN, MADE
from study.results import columns
from test_evaluate import synthetic_rows, write_scored_run

SETS = ("roleplay_all_test", "alpaca_gpt4_zh")


def readme_table() -> dict[str, list[str]]:
    """The README's demo table: row id -> its cells after the five that name the run."""
    text = (REPO / "README.md").read_text(encoding="utf-8").split("## Demo results", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[cells[0]] = cells[5:]
    return rows


def test_the_readme_table_is_the_reference_of_expected_json():
    """Every number of the README's demo table, as shown, is the reference value of data/demo/expected.json."""
    reference = json.loads((REPO / expected.EXPECTED).read_text(encoding="utf-8"))["cells"]
    rows = readme_table()
    assert sorted(rows, key=int) == sorted(reference, key=int) == [str(i) for i in range(23)]
    for row, shown in rows.items():
        keys = [(f"{name}/{key}", decimals) for name in SETS for key, _, decimals, _ in columns()]
        assert len(shown) == len(keys)
        for text, (key, decimals) in zip(shown, keys):
            number = re.match(r"\**([+-]?[\d.]+)", text)
            if key.endswith("nll-change") and row == "0":
                assert text == "-"
                continue
            assert number and float(number.group(1)) == round(reference[row][key]["reference"], decimals), (row, key)
            assert reference[row][key]["low"] <= reference[row][key]["reference"] <= reference[row][key]["high"]


def test_the_committed_base_model_is_checked_against_its_record(tmp_path):
    demo_base.check(REPO / DEMO_BASE)  # whole, as committed
    made = json.loads((REPO / DEMO_BASE / MADE).read_text(encoding="utf-8"))
    assert made["commands"][0] == \
        f"python train.py {DEMO_BASE_TRAIN} --dataset-dir data/demo --output-dir runs/base-train"
    assert made["environment"]["OMP_NUM_THREADS"] == "1"
    copy = tmp_path / "base-model"
    shutil.copytree(REPO / DEMO_BASE, copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights.name}: sha256 .*damaged or replaced.*--retrain-base"):
        demo_base.check(copy)
    weights.unlink()
    with pytest.raises(ValueError, match="sha256 missing"):
        demo_base.check(copy)


def scored_runs(runs, shift: float):
    """Rows 0 and 1 with synthetic per-sample scores, every score of row 1 one more than row 0's, plus `shift`."""
    for row in (0, 1):
        rows = synthetic_rows(20, 0)
        for r in rows:
            r.update({k: v + (1 + shift) * row for k, v in r.items() if k not in ("index", "target_tokens")})
        write_scored_run(runs, f"{row}-x", {"id": row, "method": "none" if row == 0 else "lora"},
                         {name: rows for name in SETS})


def test_compare_says_equal_within_or_outside(tmp_path, monkeypatch):
    scored_runs(tmp_path / "ref", 0.0)
    scored_runs(tmp_path / "other", 0.2)  # another machine: row 1 moves, row 0 does not
    scored_runs(tmp_path / "mine", 0.1)  # between the two
    scored_runs(tmp_path / "far", 0.5)
    spread = expected.spread(tmp_path / "ref", [("other", tmp_path / "other", 42)])
    assert spread["combinations"] == ["the reference", "other"]
    cell = spread["cells"]["1"]["roleplay_all_test/nll"]
    assert cell["low"] == cell["reference"] < cell["high"]

    lines, counts = expected.compare(tmp_path / "ref", spread)
    assert counts == {expected.EQUAL: 26, expected.WITHIN: 0, expected.OUTSIDE: 0, expected.MISSING: 0}
    assert lines == []  # nothing to name
    lines, counts = expected.compare(tmp_path / "mine", spread)
    assert counts[expected.EQUAL] == 12 and counts[expected.WITHIN] == 14
    assert len(lines) == 1 and lines[0].startswith("run 1: roleplay_all_test BLEU-4 ")  # run 0 is equal
    assert "; roleplay_all_test NLL 3.3" in lines[0] and "within the measured spread (reference 3.2" in lines[0]
    _, counts = expected.compare(tmp_path / "far", spread)
    assert counts[expected.OUTSIDE] == 14

    monkeypatch.chdir(tmp_path)
    (tmp_path / expected.EXPECTED).parent.mkdir(parents=True)
    (tmp_path / expected.EXPECTED).write_text(json.dumps({**spread, "reference": {"cpu": "a CPU"}}))
    command = [sys.executable, "-m", "study", "compare"]
    env = {"PYTHONPATH": str(REPO)}
    assert subprocess.run(command + ["mine"], env=env, capture_output=True).returncode == 0
    far = subprocess.run(command + ["far"], env=env, capture_output=True, text=True)
    assert far.returncode == 1 and far.stdout.splitlines()[-1].endswith("26 cells: 12 equal, 14 outside it")
    missing = subprocess.run(command + ["nowhere"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr == "python -m study: nowhere: no such directory " \
                                                         "(the runs of `bash launch.sh`)\n"
