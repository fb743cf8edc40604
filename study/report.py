"""runs/report.html: the runs on one page, to read their answers beside their numbers. It opens from disk with no
server and no network: the data is JSON inside the page, the chart a PNG inside it, the style and the script are
study/report.html (the template, written here, no library).

    python -m study report [RUNS]    # from a runs/ directory (default runs); evaluate.py --runs writes it too

What the page shows (study/report.html draws it from report_data):
- the table of results.md (the same cells: study.results.table_cells), sortable by any column, its legend and
  notes, and results.png;
- answers side by side: per evaluation set and sample, the prompt (with its history: the prompt as the model got
  it), the reference answer and each chosen run's answer (every seed's for rows run with several), with the
  sample's scores and NLL; samples sorted or filtered by the difference of a score between two runs, by text, by
  empty or length-capped answers;
- each run's training and validation loss (trainer_log.jsonl);
- where each number came from: per run directory, the commit and fingerprints of its training and of each set's
  scores, marked where made by other code than this checkout's (as † in the table).
"""
import base64
import html
import io
import itertools
import json
import re
from pathlib import Path

from runtime.files import read_json, read_jsonl, write_text

from .fingerprint import code_fingerprint, git_commit, other_code
from .metrics import METRICS, TITLES
from .results import BASE_ID, RUN_COLUMNS, columns, markdown_table, table_cells, write_chart
from .rundir import LOG, RUN_CONFIG, RUN_JSON, TRAIN_RESULTS, RunFileError, is_number, set_metrics, set_predictions

REPORT = "report.html"
TEMPLATE = Path(__file__).with_name("report.html")
SCORES = (*METRICS, "nll")  # what each answer shows of its sample's scores


def write_report(runs_dir: Path, runs: list[dict], datasets: list[str], top: int, code: str | None = None) -> Path:
    """runs_dir/report.html of `runs` (study.results.read_runs, with the same `code`: this checkout's)."""
    path = Path(runs_dir) / REPORT
    write_text(path, page(report_data(runs, datasets, top, code or code_fingerprint())))
    return path


def page(data: dict) -> str:
    """The template with the data in it. "<" is escaped inside the JSON, so that no text of a run (an answer that
    says "</script>") can end the script element that holds it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return TEMPLATE.read_text(encoding="utf-8").replace("__DATA__", text)


def report_data(runs: list[dict], datasets: list[str], top: int, code: str) -> dict:
    """What the page draws, as plain JSON values."""
    commit, dirty = git_commit()
    answers = {name: answer_sets(runs, name) for name in datasets}
    return {
        "made": {"commit": commit, "dirty": dirty, "code": code},
        "sets": list(datasets),
        "base": BASE_ID,
        "scores": [{"key": k, "title": TITLES.get(k, "NLL"), "decimals": 3 if k == "nll" else 2} for k in SCORES],
        "table": {"head": list(RUN_COLUMNS), "titles": [title for _, title, _, _ in columns()],
                  "rows": table_cells(runs, datasets, top)},
        "legend": legend_html(markdown_table(runs, datasets, top).split("\n\n", 1)[1]),
        "chart": "data:image/png;base64," + base64.b64encode(chart_png(runs, datasets)).decode(),
        "samples": {name: samples for name, (samples, _) in answers.items()},
        "runs": [{"id": int(run["id"]), "label": label(run), "other_code": run["other_code"],
                  "dirs": [run_dir_record(d, datasets, code) for d in run_dirs(run)],
                  "answers": {name: by_run[i] for name, (_, by_run) in answers.items()}}
                 for i, run in enumerate(runs)],
    }


def label(run: dict) -> str:
    """'17 lora qkv 3-5', '18 lora qkv 3-5 aux', '0 none': what names a run on the page."""
    parts = [str(run["id"]), *(str(run.get(k, "-")) for k in ("method", "target", "layers"))]
    return " ".join(p for p in parts if p != "-") + (" aux" if run.get("aux") else "")


def run_dirs(run: dict) -> list[Path]:
    """Every seed's directory of a table row (study.results.pool_seeds)."""
    return run.get("dirs", [run["dir"]])


def answer_sets(runs: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """The samples of one evaluation set that any run answered ({"index", "prompt", "label"}, by index) and, per
    run, aligned with them: "answers" (each seed's answer; None where it has none), "capped" (each seed's answer
    hit the length cap), "scores" (per key the sample's score to 4 decimals, as metrics.py rounds them; None where
    none; averaged over the seeds as in the table), "asked" (sample position -> the prompt where this run was given
    another one than the first run) and "problems" (files that are there but cannot be read)."""
    read = []  # per run, per seed directory: {index: prediction row}
    problems = []
    for run in runs:
        rows, trouble = [], []
        for d in run_dirs(run):
            try:
                rows.append({r["index"]: r for r in set_predictions(d, name) or []})
            except RunFileError as e:
                rows.append({})
                trouble.append(str(e))
        if name in run["unreadable"]:
            trouble.append(run["unreadable"][name])
        read.append(rows)
        problems.append(trouble)
    first = {}  # index -> the row of the first run that answered it: its prompt and label are the set's
    for rows in read:
        for by_index in rows:
            for i, row in by_index.items():
                first.setdefault(i, row)
    indices = sorted(first)
    samples = [{"index": i, "prompt": first[i]["prompt"], "label": first[i]["label"]} for i in indices]
    by_run = []
    for run, rows, trouble in zip(runs, read, problems):
        scores = {r["index"]: r for r in run["scores"][name] or []}
        asked = {}
        for k, i in enumerate(indices):
            row = next((by_index[i] for by_index in rows if i in by_index), None)
            if row is not None and row["prompt"] != first[i]["prompt"]:
                asked[k] = row["prompt"]
        by_run.append({
            "answers": [[by_index[i]["predict"] if i in by_index else None for by_index in rows] for i in indices],
            "capped": [[bool(by_index.get(i, {}).get("hit_length_cap")) for by_index in rows] for i in indices],
            "scores": {k: [round(scores[i][k], 4) if k in scores.get(i, {}) else None for i in indices]
                       for k in SCORES},
            "asked": asked, "problems": trouble})
    return samples, by_run


def run_dir_record(run_dir: Path, datasets: list[str], code: str) -> dict:
    """One run directory's provenance and loss curves: "name", "seed"; "train" (None for a row that is not
    trained) with the commit of run_config.json and the fingerprints of train_results.json; per set in "eval" the
    commit and fingerprints of its metrics.json ({"problem"} where damaged, None where missing); "other_code" on
    each where made by other code than `code`; "loss" and "val_loss": [step, value] pairs."""
    run_json, config, results = (as_dict(read_json(run_dir / n)) for n in (RUN_JSON, RUN_CONFIG, TRAIN_RESULTS))
    train = None
    if run_json.get("method", "none") != "none":
        train = {"commit": config.get("git_commit"), "dirty": config.get("git_dirty"),
                 "fingerprint": results.get("fingerprint"), "finished": bool(results),
                 "other_code": bool(results) and other_code(results, code)}  # as the table's †
    scored = {}
    for name in datasets:
        try:
            m = set_metrics(run_dir, name)
        except RunFileError as e:
            scored[name] = {"problem": str(e)}
            continue
        scored[name] = None if m is None else {"commit": m.get("git_commit"), "dirty": m.get("git_dirty"),
                                               "fingerprint": m.get("fingerprint"), "other_code": other_code(m, code)}
    log = [r for r in read_jsonl(run_dir / LOG) if isinstance(r, dict)] if (run_dir / LOG).is_file() else []
    return {"name": run_dir.name, "seed": run_json.get("seed"), "train": train, "eval": scored,
            **{key: [[r["step"], r[key]] for r in log if is_number(r.get(key)) and is_number(r.get("step"))]
               for key in ("loss", "val_loss")}}


def as_dict(content) -> dict:
    """A run file's JSON where it is an object; {} where it is missing, damaged or edited into something else (the
    page shows what is known; the table names the damaged files)."""
    return content if isinstance(content, dict) else {}


def chart_png(runs: list[dict], datasets: list[str]) -> bytes:
    """results.png's chart, as bytes."""
    out = io.BytesIO()
    write_chart(out, runs, datasets)
    return out.getvalue()


def legend_html(markdown: str) -> str:
    """results.md's text under the table as HTML: its "- " lists, **bold** and `code`."""
    def inline(line: str) -> str:
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(line, quote=False))
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    lines = [line for line in markdown.splitlines() if line.strip()]
    out = []
    for listed, group in itertools.groupby(lines, key=lambda line: line.startswith("- ")):
        if listed:
            out.append("<ul>" + "".join(f"<li>{inline(line[2:])}</li>" for line in group) + "</ul>")
        else:
            out += [f"<p>{inline(line)}</p>" for line in group]
    return "\n".join(out)
