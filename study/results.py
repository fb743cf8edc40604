"""The comparison of runs: results.md (the study's table), results.csv and results.png, with uncertainty.

A run is a directory with run.json (launch.sh writes its id, method, target, layers, aux) and, per
evaluation set, eval/<set>/metrics.json and scores.jsonl (evaluate.py). Columns follow `metrics.METRICS`,
titled by `metrics.TITLES` (a metric added there shows up here), then NLL, its change from run 0 and PPL.
A value is the mean over samples with its 95% bootstrap interval (metrics.json); every run is compared with
run 0 (the base model) by a paired bootstrap over the samples both were scored on (stats.paired_difference).
"""
import csv
from pathlib import Path

import numpy as np

from runtime.files import InputError, load_json, read_json, write_text

from .fingerprint import code_fingerprint, made_by_other_code
from .grid import GRID
from .metrics import METRICS, TITLES, score_stats
from .rundir import RUN_JSON, TRAIN_RESULTS, RunFileError, set_metrics, set_scores
from .stats import LEVEL, METHOD, RESAMPLES, SEED, paired_difference, significant

RUN_COLUMNS = ("id", "method", "target", "layers", "aux")
BASE_ID = next(row.id for row in GRID if row.method == "none")  # every other row is compared with the base model
UNREADABLE = "?"  # a cell whose files are there but damaged (study.rundir.RunFileError)
OTHER_CODE = "†"  # marks a run whose numbers came from other code than this checkout's (fingerprint.py)
ABOVE, BELOW = "▲", "▼"  # the paired interval of the difference from run 0 lies above / below 0
LEGEND = (
    f"- Each value: mean over samples ±half the width of its {LEVEL:.0%} bootstrap interval ({METHOD} method, "
    f"{RESAMPLES} resamples, seed {SEED}).\n"
    f"- {ABOVE} / {BELOW}: higher / lower than run {BASE_ID} beyond chance: by a paired bootstrap over the same "
    f"samples, the {LEVEL:.0%} interval of the mean difference excludes 0. ΔNLL: that difference for the NLL.\n"
    "- NLL: mean negative log-likelihood (natural log) per token of the reference answers under the training prompt, "
    "without sampling; PPL = exp(NLL). Lower is better; a rise over run 0 is forgetting.\n"
    "- **bold**: the best value of each column as shown (the K best with --bold-top K); ΔNLL is not ranked.\n"
    "- Rows run with k seeds (launch.sh SEEDS=k): the mean over the seeds, ± half of the pooled interval (each "
    "sample's scores averaged over the seeds), then `sd`: the standard deviation of the seeds' own means.\n")


def columns() -> list[tuple[str, str, int, int]]:
    """The columns of one evaluation set: (key, title, decimals, better: 1 higher, -1 lower, 0 not ranked)."""
    return ([(m, TITLES[m], 2, 1) for m in METRICS] +
            [("nll", "NLL", 3, -1), ("nll-change", "ΔNLL", 3, 0), ("ppl", "PPL", 2, -1)])


def read_runs(runs_dir: Path, datasets: list[str], code: str | None = None, seed: int | None = None) -> list[dict]:
    """Every runs_dir/*/run.json (of one seed where `seed` is given) with its metrics and per-sample scores per
    evaluation set (None where missing), sorted by id; run["unreadable"][set] says what is wrong with a set's files
    that are there but damaged (its cells show "?"); run["other_code"] is True when its training or scores were made
    by other code than `code` (this checkout's); run["vs_base"][set][key] = (mean difference from run 0, low, high)
    where both have scores."""
    code = code or code_fingerprint()
    runs = []
    for run_json in runs_dir.glob(f"*/{RUN_JSON}"):
        fix = "launch.sh writes this file: delete it and run bash launch.sh again"
        run = load_json(run_json, fix)
        if not (isinstance(run, dict) and isinstance(run.get("id"), int)):
            raise InputError(f"{run_json}: not a grid row with an integer id; {fix}")
        if seed is not None and run.get("seed", 42) != seed:
            continue
        run["dir"] = run_json.parent
        run["metrics"], run["scores"], run["unreadable"] = {}, {}, {}
        for name in datasets:
            try:
                run["metrics"][name] = set_metrics(run["dir"], name, numbers=(*METRICS, "nll", "ppl"))
                run["scores"][name] = set_scores(run["dir"], name)
            except RunFileError as e:
                run["metrics"][name] = run["scores"][name] = None
                run["unreadable"][name] = str(e)
        train = read_json(run["dir"] / TRAIN_RESULTS) if run.get("method", "none") != "none" else None
        run["other_code"] = made_by_other_code(train, list(run["metrics"].values()), code)
        runs.append(run)
    runs.sort(key=lambda r: (int(r["id"]), r.get("seed", 42)))
    runs = [pool_seeds([r for r in runs if r["id"] == i], datasets) for i in dict.fromkeys(r["id"] for r in runs)]
    base = next((r for r in runs if int(r["id"]) == BASE_ID), None)
    for run in runs:
        run["vs_base"] = {name: compare(base["scores"][name], run["scores"][name])
                          if base is not None and run is not base else {} for name in datasets}
    return runs


def pool_seeds(group: list[dict], datasets: list[str]) -> dict:
    """The runs of one grid row with different seeds (launch.sh SEEDS=k) -> one row. Per set, each sample's scores
    (and NLL) are averaged over the seeds; the row's values are their means with the pooled interval (bootstrap
    over samples of those averages), metrics["seeds"] holds the sd over the seeds' own means, and "dirs" every
    seed's run directory ("dir" is the first's). A set is missing (None) unless every seed scored the same samples.
    One run stays as it is."""
    if len(group) == 1:
        return group[0]
    row = {**group[0], "seeds": [r.get("seed") for r in group], "dirs": [r["dir"] for r in group],
           "other_code": any(r["other_code"] for r in group),
           "unreadable": {name: e for r in group for name, e in r["unreadable"].items()}}
    row["metrics"], row["scores"] = {}, {}
    for name in datasets:
        scores = [r["scores"][name] for r in group]
        if not all(scores) or len({tuple(x["index"] for x in s) for s in scores}) != 1:
            row["metrics"][name] = row["scores"][name] = None
            continue
        keys = [k for k in (*METRICS, "nll") if all(k in x for s in scores for x in s)]
        pooled = [{**first, **{k: sum(s[i][k] for s in scores) / len(scores) for k in keys}}
                  for i, first in enumerate(scores[0])]
        means = {k: [r["metrics"][name][k] for r in group] for k in METRICS}
        sd = {k: float(np.std(v, ddof=1)) for k, v in means.items()}
        row["metrics"][name], row["scores"][name] = {**score_stats(pooled), "seeds": {"sd": sd}}, pooled
    return row


def compare(base: list[dict] | None, rows: list[dict] | None) -> dict:
    """Per-sample scores of run 0 and of a run -> {key: (run minus run 0, low, high)} by paired bootstrap, for the
    metrics and the NLL (per token: weighted by the reference tokens); {} unless both scored the same samples."""
    if not base or not rows or [r["index"] for r in base] != [r["index"] for r in rows]:
        return {}
    both = base + rows
    out = {k: paired_difference([r[k] for r in base], [r[k] for r in rows]) for k in METRICS
           if all(k in r for r in both)}
    if all("nll" in r for r in both) and [r["target_tokens"] for r in base] == [r["target_tokens"] for r in rows]:
        out["nll"] = paired_difference([r["nll"] for r in base], [r["nll"] for r in rows],
                                       [r["target_tokens"] for r in rows])
    return {k: tuple(round(x, 6) for x in v) for k, v in out.items()}


def value(run: dict, name: str, key: str) -> tuple | None:
    """(mean, low, high) of one cell, low and high None where metrics.json has no interval; None where missing."""
    if key == "nll-change":
        return run["vs_base"][name].get("nll")
    m = run["metrics"][name]
    if not m or m.get(key) is None:
        return None
    low, high = (m.get("interval") or {}).get(key, (None, None))
    return m[key], low, high


def seed_sd(run: dict, name: str, key: str) -> str:
    """' sd 0.52' after the mean of a row pooled over seeds, else ''."""
    sd = ((run["metrics"][name] or {}).get("seeds") or {}).get("sd", {}).get(key)
    return "" if sd is None else f" sd {sd:.2f}"


def mark(run: dict, name: str, key: str) -> str:
    """' ▲' / ' ▼' where the run differs from run 0 beyond chance (metrics and ΔNLL), else ''."""
    compared = "nll" if key == "nll-change" else key if key in METRICS else None  # NLL and PPL: see ΔNLL
    diff = run["vs_base"][name].get(compared)
    if diff is None or not significant(diff[1], diff[2]):
        return ""
    return " " + (ABOVE if diff[1] > 0 else BELOW)


def cell(v: tuple, decimals: int, signed: bool) -> str:
    """'18.50 ±1.20': the mean and the half-width of its interval (the mean alone without an interval)."""
    mean, low, high = v
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    return text if low is None else f"{text} ±{(high - low) / 2:.{decimals}f}"


def table_cells(runs: list[dict], datasets: list[str], top: int) -> list[list[dict]]:
    """The table's cells per run: id (with its mark where made by other code), method, target, layers, aux, then
    per set and column. A cell: "text" ('-' where missing, '?' where unreadable), "bold" (among the `top` best
    distinct means of its column, as displayed, so ties tie), "note" (the sd over seeds and the mark), "mean" (the
    number behind it; None where none: the run columns but the id sort as text)."""
    def plain(text: str, mean: int | None = None) -> dict:
        return {"text": text, "bold": False, "note": "", "mean": mean}

    rows = [[plain(str(run["id"]) + (OTHER_CODE if run["other_code"] else ""), int(run["id"])),
             *(plain(str(run.get(k, "-"))) for k in ("method", "target", "layers")),
             plain("yes" if run.get("aux") else "no")] for run in runs]
    for name in datasets:
        for key, _, decimals, better in columns():
            values = [value(run, name, key) for run in runs]
            shown = {round(v[0], decimals) for v in values if v is not None}
            best = sorted(shown, reverse=better > 0)[:top] if better else []
            for row, run, v in zip(rows, runs, values):
                text = "-" if v is None else cell(v, decimals, key == "nll-change")
                row.append({"text": UNREADABLE if name in run["unreadable"] else text,
                            "bold": v is not None and round(v[0], decimals) in best,
                            "note": seed_sd(run, name, key) + mark(run, name, key),
                            "mean": None if v is None else v[0]})
    return rows


def table_rows(runs: list[dict], datasets: list[str], top: int) -> list[list[str]]:
    """The cells of table_cells as markdown: bold as **text**, then the note."""
    return [[(f"**{c['text']}**" if c["bold"] else c["text"]) + c["note"] for c in row]
            for row in table_cells(runs, datasets, top)]


def markdown_table(runs: list[dict], datasets: list[str], top: int) -> str:
    """The study's layout: a header naming the sets, a separator, a row naming the columns, one row per run,
    then what the cells mean."""
    cols = columns()
    header = list(RUN_COLUMNS)
    for name in datasets:
        header += [name] + ["-"] * (len(cols) - 1)
    title_row = ["-"] * len(RUN_COLUMNS) + [title for _ in datasets for _, title, _, _ in cols]
    lines = [header, ["-" * len(h) for h in header], title_row] + table_rows(runs, datasets, top)
    text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n\n" + LEGEND
    if any(run["other_code"] for run in runs):
        text += (f"\n{OTHER_CODE} made by other code than this checkout's (its fingerprint differs): "
                 "`bash launch.sh --rerun-stale` redoes these runs\n")
    for run in runs:
        for problem in run["unreadable"].values():
            text += f"\n{UNREADABLE} run {run['id']}: {problem}; `bash launch.sh {run['id']}` evaluates it again\n"
    return text


def write_csv(path: Path, runs: list[dict], datasets: list[str]):
    """Per set and key: the mean, its interval (low, high) and, except for PPL, the paired difference from run 0
    (vs_base, vs_base_low, vs_base_high); empty where missing."""
    keys = [*METRICS, "nll", "ppl"]
    header = ["id", "name", "method", "target", "layers", "aux", "other_code"]
    for n in datasets:
        for k in keys:
            header += [f"{n}/{k}", f"{n}/{k}/low", f"{n}/{k}/high"]
            header += [f"{n}/{k}/vs_base", f"{n}/{k}/vs_base_low", f"{n}/{k}/vs_base_high"] if k != "ppl" else []
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for run in runs:
            cells = [run["id"], run.get("name", run["dir"].name), run.get("method"), run.get("target"),
                     run.get("layers"), bool(run.get("aux")), run["other_code"]]
            for n in datasets:
                for k in keys:
                    cells += ["" if v is None else v for v in (value(run, n, k) or (None,) * 3)]
                    cells += run["vs_base"][n].get(k, ("",) * 3) if k != "ppl" else []
            w.writerow(cells)


def chart_grid(runs: list[dict], datasets: list[str]) -> dict:
    """What results.png shows, per run (rows) and (set, metric or NLL) (columns): "labels", "values" and "half"
    (half-width of the interval; NaN where none) (runs, columns), "better" per column, and "hatched": the cells of
    runs whose paired difference from run 0 does not exclude 0."""
    import numpy as np

    cols = [(k, title, better) for k, title, _, better in columns() if k in (*METRICS, "nll")]
    cells = [[value(run, n, k) for n in datasets for k, _, _ in cols] for run in runs]
    diffs = [[run["vs_base"][n].get(k) for n in datasets for k, _, _ in cols] for run in runs]
    return {"labels": [f"{n}\n{title}" for n in datasets for _, title, _ in cols],
            "values": np.array([[np.nan if v is None else v[0] for v in row] for row in cells], dtype=float),
            "half": np.array([[np.nan if v is None or v[1] is None else (v[2] - v[1]) / 2 for v in row]
                              for row in cells], dtype=float),
            "better": np.array([b for _ in datasets for _, _, b in cols]),
            "hatched": np.array([[d is not None and not significant(d[1], d[2]) for d in row] for row in diffs])}


def write_chart(path: Path, runs: list[dict], datasets: list[str]):
    """A heatmap: one row per run, one column per (set, metric or NLL); the text is the mean ± the half-width of its
    interval, the colour the value as a fraction of the column's best, hatched where it is not distinguishable
    from run 0's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    grid = chart_grid(runs, datasets)
    values, half = grid["values"], grid["half"]  # (runs, columns)
    best = np.array([(np.nanmax if b > 0 else np.nanmin)(col) if (~np.isnan(col)).any() else np.nan
                     for col, b in zip(values.T, grid["better"])])
    with np.errstate(divide="ignore", invalid="ignore"):
        shade = np.where(grid["better"] > 0, values / best, best / values)  # 1 = the column's best
    shade = np.nan_to_num(shade, nan=0.0, posinf=0.0)
    fig, ax = plt.subplots(figsize=(2 + 1.15 * values.shape[1], 1.4 + 0.5 * max(len(runs), 1)))
    ax.imshow(shade, cmap="YlGn", vmin=0, vmax=1, aspect="auto")
    for i, j in zip(*np.nonzero(~np.isnan(values))):
        d = 3 if grid["better"][j] < 0 else 2  # NLL: as in the table
        text = f"{values[i, j]:.{d}f}" + ("" if np.isnan(half[i, j]) else f"\n±{half[i, j]:.{d}f}")
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if shade[i, j] > 0.7 else "black")
        if grid["hatched"][i, j]:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey", lw=0))
    per_set = values.shape[1] // max(len(datasets), 1)
    for j in range(per_set, values.shape[1], per_set):
        ax.axvline(j - 0.5, color="black", linewidth=1.5)  # between evaluation sets
    ax.set_xticks(range(values.shape[1]), grid["labels"], fontsize=7)
    ax.set_yticks(range(len(runs)), [f"{r['id']}{OTHER_CODE if r['other_code'] else ''} {r.get('method')} "
                                     f"{r.get('target')} {r.get('layers')}{' aux' if r.get('aux') else ''}"
                                     for r in runs], fontsize=8)
    ax.set_title(f"mean ± half of the {LEVEL:.0%} bootstrap interval; colour: fraction of the column's best "
                 f"(NLL: lowest); hatched: not different from run {BASE_ID} (paired bootstrap)", fontsize=8)
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
