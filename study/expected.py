"""The demo's table as the README shows it, and how far each cell moves with what a user does not control: the
CPU's code paths and the seed. EXPECTED holds, per row and cell, the reference value (the README's table) and the
range over the measured combinations (BENCHMARKS.md, "The demo on other machines").

    python -m study compare [RUNS]                       # a user's runs/ against it, cell by cell
    python -m study spread REF_DIR [NAME DIR SEED ...]   # (re)write it: the reference, then each combination

A cell is a column of results.md (BLEU-4 ... ROUGE-l, NLL, ΔNLL, PPL) of one evaluation set, keyed
"<set>/<column>". `compare` says per cell "equal" (the same number), "within the measured spread" (between the
lowest and the highest of the combinations) or "outside" it, and exits 1 where any is outside.
"""
from pathlib import Path

from runtime.files import read_json
from runtime.machine import cpu_model

from .fingerprint import git_commit, library_versions
from .grid import DEFAULT_SEED, EVAL_SETS, Plan
from .results import columns, read_runs, value

EXPECTED = Path("data/demo/expected.json")
EQUAL, WITHIN, OUTSIDE, MISSING = "equal", "within the measured spread", "outside it", "missing"


def cells(runs_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, dict[str, float]]:
    """{row id: {"<set>/<column>": the cell's value}} of one seed's runs in runs_dir (missing cells left out)."""
    table = {}
    for run in read_runs(Path(runs_dir), list(EVAL_SETS), seed=seed):
        row = table.setdefault(str(run["id"]), {})
        for name in EVAL_SETS:
            for key, _, _, _ in columns():
                v = value(run, name, key)
                if v is not None and name not in run["unreadable"]:
                    row[f"{name}/{key}"] = v[0]
    return table


def spread(reference: Path, combinations: list[tuple[str, Path, int]]) -> dict:
    """EXPECTED's content: the reference table (seed 42 of `reference`) and each cell's range over it and the
    combinations (name, runs directory, seed)."""
    tables = [cells(reference)] + [cells(d, seed) for _, d, seed in combinations]
    commit, _ = git_commit()
    out = {"reference": {"command": "bash launch.sh", "seed": DEFAULT_SEED, "environment": Plan.from_env().cpu_env(),
                         "cpu": cpu_model(), "versions": library_versions(), "commit": commit},
           "combinations": ["the reference"] + [name for name, _, _ in combinations], "cells": {}}
    for row, ref in tables[0].items():
        out["cells"][row] = {}
        for key, v in ref.items():
            seen = [t[row][key] for t in tables if key in t.get(row, {})]
            if len(seen) < len(tables):
                raise ValueError(f"row {row}, {key}: missing in {len(tables) - len(seen)} of the combinations")
            out["cells"][row][key] = {"reference": v, "low": min(seen), "high": max(seen)}
    return out


def verdict(got: float | None, cell: dict) -> str:
    if got is None:
        return MISSING
    if got == cell["reference"]:
        return EQUAL
    return WITHIN if cell["low"] <= got <= cell["high"] else OUTSIDE


def compare(runs_dir: Path, expected: dict) -> tuple[list[str], dict[str, int]]:
    """A line per row of `expected` (seed 42 of runs_dir) with cells not equal, naming them, and the count of cells
    per verdict."""
    got = cells(runs_dir)
    titles = {key: title for key, title, _, _ in columns()}
    lines, counts = [], {EQUAL: 0, WITHIN: 0, OUTSIDE: 0, MISSING: 0}
    for row, row_cells in expected["cells"].items():
        verdicts = {key: verdict(got.get(row, {}).get(key), cell) for key, cell in row_cells.items()}
        for v in verdicts.values():
            counts[v] += 1
        if all(v == EQUAL for v in verdicts.values()):
            continue
        detail = []
        for key, v in verdicts.items():
            if v != EQUAL:
                name, column = key.split("/")
                cell = row_cells[key]
                mine = "-" if v == MISSING else f"{got[row][key]:.6g}"
                detail.append(f"{name} {titles[column]} {mine}: {v} (reference {cell['reference']:.6g}, "
                              f"spread {cell['low']:.6g} to {cell['high']:.6g})")
        lines.append(f"run {row}: " + "; ".join(detail))
    return lines, counts


def main(args: list[str]):
    runs_dir = Path(args[0] if args else "runs")
    expected = read_json(EXPECTED)
    if expected is None:
        raise ValueError(f"{EXPECTED}: missing or unreadable; `git checkout {EXPECTED}`")
    if not runs_dir.is_dir():
        raise ValueError(f"{runs_dir}: no such directory (the runs of `bash launch.sh`)")
    lines, counts = compare(runs_dir, expected)
    for line in lines:
        print(line)
    print(f"{runs_dir} against {EXPECTED} (the README's table, {expected['reference']['cpu']}; "
          f"{len(expected['combinations'])} combinations measured), {sum(counts.values())} cells: " +
          ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    return 1 if counts[OUTSIDE] else 0
