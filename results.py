"""The comparison of runs: results.md (the study's table), results.csv and results.png.

A run is a directory with run.json (launch.sh writes its id, method, target, layers, aux) and, per
evaluation set, eval/<set>/metrics.json (evaluate.py). Columns follow `metrics.METRICS`, titled by
`metrics.TITLES`: a metric added there shows up here.
"""
import csv
import json
from pathlib import Path

from files import write_text
from fingerprint import code_fingerprint, made_by_other_code, read_json
from metrics import METRICS, TITLES

RUN_COLUMNS = ("id", "method", "target", "layers", "aux")


OTHER_CODE = "†"  # marks a run whose numbers came from other code than this checkout's (fingerprint.py)


def read_runs(runs_dir: Path, datasets: list[str], code: str | None = None) -> list[dict]:
    """Every runs_dir/*/run.json with its metrics per evaluation set (None where missing), sorted by id;
    run["other_code"] is True when its training or scores were made by other code than `code` (this checkout's)."""
    code = code or code_fingerprint()
    runs = []
    for run_json in runs_dir.glob("*/run.json"):
        run = json.loads(run_json.read_text(encoding="utf-8"))
        run["dir"] = run_json.parent
        run["metrics"] = {name: read_json(run_json.parent / "eval" / name / "metrics.json") for name in datasets}
        train = read_json(run_json.parent / "train_results.json") if run.get("method", "none") != "none" else None
        run["other_code"] = made_by_other_code(train, list(run["metrics"].values()), code)
        runs.append(run)
    return sorted(runs, key=lambda r: int(r["id"]))


def table_rows(runs: list[dict], datasets: list[str]) -> list[list[str]]:
    """Formatted cells per run: id, method, target, layers, aux, then the values (two decimals; missing '-')."""
    rows = []
    for run in runs:
        cells = [str(run["id"]) + (OTHER_CODE if run["other_code"] else ""), str(run.get("method", "-")), str(run.get("target", "-")),
                 str(run.get("layers", "-")), "yes" if run.get("aux") else "no"]
        for name in datasets:
            m = run["metrics"][name]
            cells += [f"{m[k]:.2f}" if m else "-" for k in METRICS]
        rows.append(cells)
    return rows


def bold_best(rows: list[list[str]], first_value_col: int, top: int) -> list[list[str]]:
    """Bold every value among the `top` highest distinct values of its column (as displayed, so ties tie)."""
    out = [list(r) for r in rows]
    for c in range(first_value_col, len(rows[0]) if rows else 0):
        values = sorted({float(r[c]) for r in rows if r[c] != "-"}, reverse=True)[:top]
        for r in out:
            if r[c] != "-" and float(r[c]) in values:
                r[c] = f"**{r[c]}**"
    return out


def markdown_table(runs: list[dict], datasets: list[str], top: int) -> str:
    """The study's layout: a header naming the sets, a separator, a row naming the metrics, one row per run."""
    rows = bold_best(table_rows(runs, datasets), len(RUN_COLUMNS), top)
    header = list(RUN_COLUMNS)
    for name in datasets:
        header += [name] + ["-"] * (len(METRICS) - 1)
    metric_row = ["-"] * len(RUN_COLUMNS) + [TITLES[m] for _ in datasets for m in METRICS]
    lines = [header, ["-" * len(h) for h in header], metric_row] + rows
    text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"
    if any(run["other_code"] for run in runs):
        text += (f"\n{OTHER_CODE} made by other code than this checkout's (its fingerprint differs): "
                 "`bash launch.sh --rerun-stale` redoes these runs\n")
    return text


def write_csv(path: Path, runs: list[dict], datasets: list[str]):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "name", "method", "target", "layers", "aux", "other_code"] +
                   [f"{n}/{m}" for n in datasets for m in METRICS])
        for run in runs:
            values = [run["metrics"][n][m] if run["metrics"][n] else "" for n in datasets for m in METRICS]
            w.writerow([run["id"], run.get("name", run["dir"].name), run.get("method"), run.get("target"),
                        run.get("layers"), bool(run.get("aux")), run["other_code"]] + values)


def write_chart(path: Path, runs: list[dict], datasets: list[str]):
    """A heatmap: one row per run, one column per (set, metric); colour = value / best of its column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[run["metrics"][n][m] if run["metrics"][n] else np.nan for n in datasets for m in METRICS]
                       for run in runs], dtype=float)  # (runs, sets * metrics)
    best = np.array([max(col[~np.isnan(col)], default=0.0) for col in values.T])
    shade = values / np.where(best > 0, best, 1.0)
    fig, ax = plt.subplots(figsize=(2 + 1.1 * values.shape[1], 1.2 + 0.38 * max(len(runs), 1)))
    ax.imshow(shade, cmap="YlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if shade[i, j] > 0.7 else "black")
    for j in range(len(METRICS), values.shape[1], len(METRICS)):
        ax.axvline(j - 0.5, color="black", linewidth=1.5)  # between evaluation sets
    ax.set_xticks(range(values.shape[1]), [f"{n}\n{TITLES[m]}" for n in datasets for m in METRICS], fontsize=7)
    ax.set_yticks(range(len(runs)), [f"{r['id']}{OTHER_CODE if r['other_code'] else ''} {r.get('method')} {r.get('target')} {r.get('layers')}"
                                      f"{' aux' if r.get('aux') else ''}" for r in runs], fontsize=8)
    ax.set_title(f"{' / '.join(TITLES[m] for m in METRICS)} per run (colour: fraction of the column's best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(runs_dir: Path, runs: list[dict], datasets: list[str], top: int) -> str:
    """results.md, results.csv and results.png in runs_dir. -> the markdown table."""
    text = markdown_table(runs, datasets, top)
    write_text(runs_dir / "results.md", text)
    write_csv(runs_dir / "results.csv", runs, datasets)
    write_chart(runs_dir / "results.png", runs, datasets)
    return text
