"""runs/report.html (study/report.py): written with the table, its data checked here; then opened from disk in
headless Chromium (tests/browser.py), checked as a person sees it: the table's cells are results.csv's, two runs
answer the same sample side by side, sorting by a difference puts the largest first, the filters and keys, the
loss curves and the provenance, no error in the console, no request beyond the file, a screenshot that shows
something. The browser tests skip, saying why, where no Chromium is installed (.ci/run installs it and sets
CHROMIUM, so that in CI they run or fail)."""
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from browser import Browser, find_browser
from conftest import REPO, synthetic_rows, write_scored_run
from data.prompt import build_prompt
from study import report, results
from study.fingerprint import code_fingerprint
from study.rundir import LOG, PREDICTIONS, RUN_CONFIG, TRAIN_RESULTS

SETS = ("roleplay_all_test", "alpaca_gpt4_zh")
SIZES = {"roleplay_all_test": 449, "alpaca_gpt4_zh": 100}  # the study's role-play test set has 449 samples
RUNS = {0: ("0-base", {"method": "none", "target": "-", "layers": "-", "aux": False}),
        5: ("5-freeze-qkv-3-5", {"method": "freeze", "target": "qkv", "layers": "3-5", "aux": False}),
        17: ("17-lora-qkv-3-5", {"method": "lora", "target": "qkv", "layers": "3-5", "aux": False})}
TOP = 123  # the sample where run 17's ROUGE-l beats run 0's the most
NEEDLE = "独一无二的问题"  # a word only one prompt has


def prompt(i: int) -> str:
    """Every third sample has two rounds of history."""
    history = [[f"第{i}个问题的前一轮？", f"前一轮的回答{i}喵～"]] * 2 if i % 3 == 0 else []
    return build_prompt(NEEDLE if i == 77 else f"问题{i}？", history)


def answer(run: int, seed: int, i: int) -> dict:
    """Run 17's answer to sample 40 is empty; run 0's to sample 41 hit the length cap; one answer tries to end the
    page's script element."""
    text = "" if (run, i) == (17, 40) else f"run {run} seed {seed} answers {i}"
    text = "</script><b>not markup</b>" if (run, i) == (17, 42) else text
    return {"index": i, "prompt": prompt(i), "label": f"参考答案{i}喵～", "predict": text,
            "hit_length_cap": (run, i) == (0, 41), "new_tokens": 9}


def write_grid(runs_dir: Path):
    """Runs 0, 5 (two seeds, trained by other code) and 17, each with answers, scores and, trained, a loss log."""
    for run_id, (name, row) in RUNS.items():
        for seed in (42, 43) if run_id == 5 else (42,):
            scores = {s: synthetic_rows(n, run_id * 100 + seed + j) for j, (s, n) in enumerate(SIZES.items())}
            if run_id == 17:  # better than run 0 on role-play beyond chance: ▲ in the table
                scores["roleplay_all_test"] = [{**r, **{k: min(100.0, r[k] + 10) for k in results.METRICS}}
                                               for r in scores["roleplay_all_test"]]
            if run_id in (0, 17):  # run 17's ROUGE-l: 99 over run 0's 0 at TOP, the largest difference
                scores["roleplay_all_test"][TOP]["rouge-l"] = 99.0 if run_id == 17 else 0.0
            d = runs_dir / (name if seed == 42 else f"{name}-seed{seed}")
            write_scored_run(runs_dir, d.name, {"id": run_id, **row, "seed": seed}, scores)
            for s, n in SIZES.items():
                (d / "eval" / s / PREDICTIONS).write_text(
                    "".join(json.dumps(answer(run_id, seed, i), ensure_ascii=False) + "\n" for i in range(n)),
                    encoding="utf-8")
            if run_id:
                (d / LOG).write_text("".join(json.dumps(r) + "\n" for r in [
                    {"step": 10, "loss": 5.0 - seed / 100}, {"step": 20, "loss": 4.0}, {"step": 20, "val_loss": 4.2},
                    {"step": 30, "loss": 3.5}, {"step": 30, "val_loss": 3.9}]))
                code = "other code" if run_id == 5 else code_fingerprint()
                (d / TRAIN_RESULTS).write_text(json.dumps({"fingerprint": {"code": code}}))


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    start = text.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return json.loads(text[start:text.index("</script>", start)])


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """The grid, its table and its page, as `evaluate.py --runs` writes them."""
    runs_dir = tmp_path_factory.mktemp("runs")
    write_grid(runs_dir)
    evaluate.main(["--runs", str(runs_dir)])
    return runs_dir


def test_the_page_is_written_with_the_table(grid):
    data = page_data(grid / report.REPORT)
    runs = results.read_runs(grid, list(SETS))
    assert [[c["text"] for c in row] for row in data["table"]["rows"]] == \
        [[c["text"] for c in row] for row in results.table_cells(runs, list(SETS), 1)]
    assert results.table_rows(runs, list(SETS), 1)[1][0] == "5†"  # the same cells results.md has
    assert [r["id"] for r in data["runs"]] == [0, 5, 17] and data["base"] == 0
    for name, n in SIZES.items():
        assert [s["index"] for s in data["samples"][name]] == list(range(n))
        assert data["samples"][name][3]["prompt"].startswith("[Round 0]\n问：第3个问题的前一轮？")
    run17 = data["runs"][2]["answers"]["roleplay_all_test"]
    assert run17["answers"][7] == ["run 17 seed 42 answers 7"] and run17["answers"][40] == [""]
    assert run17["scores"]["rouge-l"][TOP] == 99.0 and run17["problems"] == [] and run17["asked"] == {}
    assert data["runs"][0]["answers"]["roleplay_all_test"]["capped"][41] == [True]
    pooled = data["runs"][1]  # run 5: both seeds' answers, its scores averaged as the table's
    assert pooled["answers"]["alpaca_gpt4_zh"]["answers"][2] == ["run 5 seed 42 answers 2", "run 5 seed 43 answers 2"]
    both = [synthetic_rows(100, 500 + seed + 1)[2]["bleu-4"] for seed in (42, 43)]
    assert pooled["answers"]["alpaca_gpt4_zh"]["scores"]["bleu-4"][2] == pytest.approx(sum(both) / 2, abs=1e-4)
    assert [(d["name"], d["train"]["other_code"]) for d in pooled["dirs"]] == \
        [("5-freeze-qkv-3-5", True), ("5-freeze-qkv-3-5-seed43", True)]
    assert data["runs"][2]["dirs"][0]["val_loss"] == [[20, 4.2], [30, 3.9]]
    assert data["runs"][0]["dirs"][0]["train"] is None  # run 0 is not trained
    # the answer that says "</script>" stays data: the page's only closing tags are its two scripts'
    assert (grid / report.REPORT).read_text(encoding="utf-8").count("</script>") == 2
    assert run17["answers"][42] == ["</script><b>not markup</b>"]


def test_a_damaged_answers_file_is_named_and_the_rest_shown(tmp_path):
    write_grid(tmp_path)
    path = tmp_path / "17-lora-qkv-3-5" / "eval" / "alpaca_gpt4_zh" / PREDICTIONS
    path.write_bytes(path.read_bytes()[:-30])  # cut short mid-line
    runs = results.read_runs(tmp_path, list(SETS))
    data = report.report_data(runs, list(SETS), 1, code_fingerprint())
    run17 = data["runs"][2]["answers"]["alpaca_gpt4_zh"]
    assert run17["problems"] == [f"{path}: invalid JSON at line 100, column 192: Unterminated string starting at; "
                                 "evaluate.py writes this file: evaluate again"]
    assert run17["answers"][5] == [None] and data["runs"][0]["answers"]["alpaca_gpt4_zh"]["answers"][5] == \
        ["run 0 seed 42 answers 5"]


def test_run_files_edited_by_hand_leave_out_what_is_wrong(tmp_path):
    """A loss log with lines that are not a step's numbers, and train_results.json / run_config.json edited into
    lists: the page shows the good points and no provenance, without a traceback."""
    write_grid(tmp_path)
    d = tmp_path / "17-lora-qkv-3-5"
    (d / LOG).write_text('{"step": 10, "loss": 5.0}\n[1]\n{"loss": 4.0}\n{"step": 20, "loss": "x"}\n'
                         '{"step": 20, "val_loss": 4.5}\n')
    for name in (TRAIN_RESULTS, RUN_CONFIG):
        (d / name).write_text("[1, 2]")
    runs = results.read_runs(tmp_path, list(SETS))
    run17 = next(r for r in report.report_data(runs, list(SETS), 1, code_fingerprint())["runs"] if r["id"] == 17)
    record = run17["dirs"][0]
    assert record["loss"] == [[10, 5.0]] and record["val_loss"] == [[20, 4.5]]
    assert record["train"] == {"commit": None, "dirty": None, "fingerprint": None, "finished": False,
                               "other_code": False}


def test_python_m_study_report(tmp_path):
    write_grid(tmp_path)
    done = subprocess.run([sys.executable, "-m", "study", "report", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / report.REPORT)
    assert len(page_data(tmp_path / report.REPORT)["samples"]["roleplay_all_test"]) == 449
    done = subprocess.run([sys.executable, "-m", "study", "report", str(tmp_path / "none")], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == f"python -m study: {tmp_path / 'none'}: no */run.json; " \
                                                   "launch.sh writes one per run\n"


def test_the_legend_in_html():
    assert report.legend_html("- a **b** `c`\n- <d>\n\nnote `e`\n") == \
        "<ul><li>a <b>b</b> <code>c</code></li><li>&lt;d&gt;</li></ul>\n<p>note <code>e</code></p>"


# ----------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser(grid):
    if find_browser() is None:
        pytest.skip("no Chromium to open the page in: apt-get install -y chromium (Debian), or set CHROMIUM")
    with Browser() as b:
        b.open(grid / report.REPORT, ready="document.documentElement.dataset.drawn === '1'")
        yield b


@pytest.fixture
def page(browser, grid):
    """The page as it opens: the table shown, run 0 chosen."""
    browser.open(grid / report.REPORT, ready="document.documentElement.dataset.drawn === '1'")
    return browser


def shown_indices(b: Browser) -> list[int]:
    return b.evaluate("[...document.querySelectorAll('#samples .sample')].map(el => Number(el.dataset.index))")


# results.csv's columns per set: key, decimals, and how it is compared with run 0 (None: not; ΔNLL: signed)
CSV_COLUMNS = [(k, 2, "marked") for k in results.METRICS] + [("nll", 3, None), ("nll/vs_base", 3, "signed"),
                                                              ("ppl", 2, None)]


def csv_cell(row: dict, name: str, key: str, decimals: int, compared: str | None) -> str:
    """What the page must show in one cell, from results.csv alone: the mean ± half its interval, and ▲ / ▼ where
    the interval of the difference from run 0 excludes 0."""
    parts = ("", "_low", "_high") if compared == "signed" else ("", "/low", "/high")
    mean, low, high = (row[f"{name}/{key}{p}"] for p in parts)
    if mean == "":
        return "-"
    sign = "+" if compared == "signed" else ""
    text = f"{float(mean):{sign}.{decimals}f} ±{(float(high) - float(low)) / 2:.{decimals}f}"
    if compared:
        diff = f"{name}/{key}" if compared == "signed" else f"{name}/{key}/vs_base"
        low, high = row[diff + "_low"], row[diff + "_high"]
        text += " ▲" if low != "" and float(low) > 0 else " ▼" if high != "" and float(high) < 0 else ""
    return text


def test_the_table_shows_results_csv(page, grid):
    with open(grid / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    shown = page.evaluate("[...document.querySelectorAll('#results tbody tr')]"
                          ".map(tr => [...tr.cells].map(td => td.innerText))")
    assert len(shown) == len(rows) == 3
    for row, cells in zip(rows, shown, strict=True):
        assert cells[:5] == [row["id"] + ("†" if row["other_code"] == "True" else ""), row["method"], row["target"],
                             row["layers"], "yes" if row["aux"] == "True" else "no"]
        values = [re.sub(r" sd \d+\.\d+", "", c) for c in cells[5:]]  # the sd over seeds: not in results.csv
        assert values == [csv_cell(row, name, *column) for name in SETS for column in CSV_COLUMNS]
    assert [c for c in shown[1] if " sd " in c] == shown[1][5:9] + shown[1][12:16]  # run 5: two seeds' metrics
    assert [c[-1] for c in shown[2][5:9]] == ["▲"] * 4  # run 17
    assert page.problems() == []


def test_sorting_the_table_by_a_column(page, grid):
    with open(grid / "results.csv", encoding="utf-8") as f:
        rouge = {r["id"]: float(r["roleplay_all_test/rouge-l"]) for r in csv.DictReader(f)}
    by_rouge = sorted(rouge, key=rouge.get, reverse=True)
    page.click("#results thead tr:nth-child(2) th:nth-child(4)")  # roleplay_all_test's ROUGE-l
    assert page.text("#results thead tr:nth-child(2) th:nth-child(4)") == "ROUGE-l ▾"
    assert [t.rstrip("†") for t in page.texts("#results tbody td:first-child")] == by_rouge
    page.click("#results thead tr:nth-child(2) th:nth-child(4)")
    assert [t.rstrip("†") for t in page.texts("#results tbody td:first-child")] == by_rouge[::-1]


def test_two_runs_answer_the_same_sample_side_by_side(page):
    page.click("#tab-answers")
    page.click("#pick input[value='17']")  # the second click
    assert page.text("#count") == "449 of 449 samples"
    first = "#samples .sample:first-child"
    assert page.evaluate(f"document.querySelector('{first}').dataset.index") == "0"
    assert page.text(f"{first} .prompt .text") == prompt(0)
    assert page.text(f"{first} .reference .text") == "参考答案0喵～"
    assert page.texts(f"{first} .answer[data-run] .text") == ["run 0 seed 42 answers 0", "run 17 seed 42 answers 0"]
    assert page.texts(f"{first} .answer[data-run] h4") == ["0 none", "17 lora qkv 3-5"]
    assert page.problems() == []


def test_a_runs_id_in_the_table_opens_its_answers(page):
    page.click("#results a[data-run='17']")
    assert page.evaluate("location.hash") == "#answers"
    assert page.texts("#samples .sample:first-child .answer[data-run] h4") == ["0 none", "17 lora qkv 3-5"]


def test_sorting_by_the_difference_puts_the_largest_first(page, grid):
    page.click("#results a[data-run='17']")
    page.choose("#metric", "rouge-l")
    page.choose("#order", "desc")
    runs = {r["id"]: r for r in results.read_runs(grid, list(SETS))}
    diffs = {a["index"]: a["rouge-l"] - b["rouge-l"]
             for a, b in zip(runs[17]["scores"]["roleplay_all_test"], runs[0]["scores"]["roleplay_all_test"])}
    order = shown_indices(page)
    assert order[0] == TOP and len(order) == 449
    assert order[:20] == sorted(diffs, key=lambda i: (-diffs[i], i))[:20]
    assert page.text("#samples .sample:first-child h3").endswith("ROUGE-l: run 17 − run 0 = +99.00")
    page.choose("#order", "asc")
    assert shown_indices(page)[-1] == TOP
    page.click("#min")
    page.type("50")  # |difference| ≥ 50
    assert set(shown_indices(page)) == {i for i, d in diffs.items() if abs(d) >= 50}


def test_filters_by_empty_or_capped_answers_and_by_text(page):
    page.click("#results a[data-run='17']")
    page.click("#empty")
    assert shown_indices(page) == [40]
    assert "empty" in page.text("#samples .sample .answer[data-run='17']")
    page.click("#empty")
    page.click("#capped")
    assert shown_indices(page) == [41]
    assert "length cap" in page.text("#samples .sample .answer[data-run='0']")
    page.click("#capped")
    page.click("#find")
    page.type(NEEDLE)
    assert shown_indices(page) == [77] and page.text("#count") == "1 of 449 samples"


def test_keys_move_from_sample_to_sample(page):
    page.click("#results a[data-run='17']")
    current = "document.querySelector('#samples .sample.current')?.dataset.index ?? null"
    assert page.evaluate(current) is None
    page.press("j")
    page.press("j")
    assert page.evaluate(current) == "1"
    page.press("k")
    assert page.evaluate(current) == "0"
    assert page.evaluate("document.querySelector('#samples .sample.current').getBoundingClientRect().top") >= 0


def test_seeds_answers_curves_and_provenance(page):
    page.click("#tab-answers")
    page.click("#pick input[value='5']")
    assert page.texts("#samples .sample:first-child .answer[data-run='5'] .text") == \
        ["run 5 seed 42 answers 0", "run 5 seed 43 answers 0"]
    page.click("#tab-curves")
    assert page.evaluate("[...document.querySelectorAll('#plots figure')].map(f => f.dataset.run)") == ["5", "17"]
    assert page.evaluate("document.querySelectorAll('#plots figure[data-run=\"5\"] polyline').length") == 4
    assert page.text("#untrained") == "No training log: 0 none."
    page.click("#tab-provenance")
    rows = page.evaluate("[...document.querySelectorAll('#prov tbody tr')].map(tr => [...tr.cells].map(td => "
                         "[td.innerText, td.className]))")
    assert [r[1][0] for r in rows] == ["0-base", "5-freeze-qkv-3-5", "5-freeze-qkv-3-5-seed43", "17-lora-qkv-3-5"]
    assert rows[1][3][1] == "other" and rows[1][3][0].startswith("† commit")  # run 5's training: other code
    assert rows[3][3][1] == "" and rows[0][3][0] == "not trained"
    assert page.problems() == []


def test_no_error_no_network_and_a_screenshot(page):
    page.click("#tab-answers")
    page.click("#pick input[value='17']")
    shot = page.screenshot()
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(shot))  # (900, 1366, 4)
    assert pixels.shape[:2] == (900, 1366)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::97]}) > 50  # text and boxes, not one colour
    assert page.problems() == []
    assert {url.split(":", 1)[0] for url in page.requests()} <= {"file", "data"}
