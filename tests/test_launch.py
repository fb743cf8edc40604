"""launch.sh --dry-run: the id -> arguments mapping against the study's grid (../shared/docs/experiment.md)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model import ChatGLMConfig

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO.parent / "shared" / "docs" / "experiment.md"

# The grid as experiment.md writes it (id, method, trains, layers, aux); checked against the file when present.
GRID = """
| 0 | none (base model) | - | - | - |
| 1 | Freeze | mlp | 25-27 | no |
| 2 | Freeze | mlp | 25-27 | yes |
| 3 | Freeze | mlp | 0-2 | no |
| 4 | Freeze | mlp | 0-2 | yes |
| 5 | Freeze | qkv | 25-27 | no |
| 6 | Freeze | qkv | 25-27 | yes |
| 7 | Freeze | qkv | 0-2 | no |
| 8 | Freeze | qkv | 0-2 | yes |
| 9 | P-Tuning v2 | prefix encoder | - | no |
| 10 | P-Tuning v2 | prefix encoder | - | yes |
| 11 | LoRA | mlp | 25-27 | no |
| 12 | LoRA | mlp | 25-27 | yes |
| 13 | LoRA | mlp | 0-2 | no |
| 14 | LoRA | mlp | 0-2 | yes |
| 15 | LoRA | mlp | 0-27 | no |
| 16 | LoRA | mlp | 0-27 | yes |
| 17 | LoRA | qkv | 25-27 | no |
| 18 | LoRA | qkv | 25-27 | yes |
| 19 | LoRA | qkv | 0-2 | no |
| 20 | LoRA | qkv | 0-2 | yes |
| 21 | LoRA | qkv | 0-27 | no |
| 22 | LoRA | qkv | 0-27 | yes |
"""
METHODS = {"none (base model)": None, "Freeze": "freeze", "P-Tuning v2": "ptuning", "LoRA": "lora"}


def parse_grid(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    return rows


def dry_run(env_extra, *ids):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA_DIR", "NPROC", "PARALLEL", "RUNS")}
    out = subprocess.run(["bash", "launch.sh", "--dry-run", *map(str, ids)], cwd=REPO, capture_output=True,
                         text=True, env={**env, "PY": sys.executable, **env_extra}, check=True).stdout
    runs, current = {}, None
    for line in out.splitlines():
        m = re.match(r"# (\d+): (\S+)", line)
        if m:
            current = runs.setdefault(int(m.group(1)), {"name": m.group(2), "cmds": []})
        elif current is not None and line.strip():
            current["cmds"].append(line.split())
    return runs


def arg(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_grid_copy_matches_experiment_md():
    if not EXPERIMENT.is_file():
        pytest.skip("../shared/docs/experiment.md not present")
    assert parse_grid(EXPERIMENT.read_text(encoding="utf-8")) == parse_grid(GRID)


@pytest.fixture
def model_6b(tmp_path):
    d = tmp_path / "chatglm-6b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ChatGLMConfig().to_dict()))
    return d


def test_every_id_maps_to_the_grid_on_the_released_depth(model_6b):
    runs = dry_run({"MODEL": str(model_6b), "NPROC": "1"})
    grid = parse_grid(GRID)
    assert sorted(runs) == list(range(23))
    for i, (method, trains, layers, aux) in grid.items():
        cmds = runs[i]["cmds"]
        train = [c for c in cmds if "train.py" in c]
        evals = [c for c in cmds if "evaluate.py" in c]
        assert len(evals) == 1
        ev = evals[0]
        assert arg(ev, "--dataset") == "roleplay_all_test,alpaca_gpt4_zh" and arg(ev, "--max-samples") == "100"
        assert arg(ev, "--model") == str(model_6b)
        if METHODS[method] is None:
            assert train == [] and "--checkpoint" not in ev
            continue
        (tr,) = train
        assert arg(tr, "--method") == METHODS[method]
        assert arg(ev, "--checkpoint") == arg(tr, "--output-dir")
        assert arg(tr, "--dataset") == ("roleplay_all_train,chat_aux_zh" if aux == "yes" else "roleplay_all_train")
        assert arg(tr, "--max-samples") == ("10000" if aux == "yes" else None)
        if METHODS[method] == "ptuning":
            assert arg(tr, "--layers") is None and arg(tr, "--target") is None
        else:
            assert arg(tr, "--target") == trains and arg(tr, "--layers") == layers
        # the study's settings are train.py's defaults: nothing overrides them on a real checkpoint
        assert arg(tr, "--lr") is None and arg(tr, "--epochs") is None
    assert len({r["name"] for r in runs.values()}) == 23


def test_tiny_default_maps_last_and_first_three_to_its_depth():
    depth = ChatGLMConfig.from_name("tiny").num_layers
    runs = dry_run({}, 1, 3, 15)
    assert sorted(runs) == [1, 3, 15]
    layers = {i: arg([c for c in r["cmds"] if "train.py" in c][0], "--layers") for i, r in runs.items()}
    assert layers == {1: f"{depth - 3}-{depth - 1}", 3: "0-2", 15: f"0-{depth - 1}"}


def test_multi_gpu_runs_through_torchrun(model_6b):
    runs = dry_run({"MODEL": str(model_6b), "NPROC": "8"}, 17)
    for cmd in runs[17]["cmds"]:
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "8"]
