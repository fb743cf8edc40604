"""Datasets by name: `dataset_info.json`, sha1 checks, column mapping, `.json`/`.jsonl` reading, validation.

A dataset directory holds `dataset_info.json` (the schema of the study's code):
    {"name": {"file_name": "x.json", "file_sha1": "...", "columns": {"prompt": "instruction", "query": "input",
              "response": "output", "history": "history"}}}
`columns` is optional (those defaults), and so is `file_sha1`. A file is a JSON list of records or JSON lines.
Every record that will be used is validated before anything else; problems name the file, the record and the fix.
"""
import json
import random
import re
from pathlib import Path

from runtime.files import InputError, file_digest, load_json, load_jsonl, parse_json, read_utf8

# Pieces of the ChatGLM vocabulary that must never come from data text: the tokenizer would turn them into
# control tokens and silently change the sample's structure (a stray [gMASK] or <sop> moves the prompt boundary).
RESERVED_STRINGS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<unused_0>",
                    "<pad>", "<unk>"]
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}


class DataError(InputError):
    """An expected problem with the data or its registration; the message says where and how to fix it."""


def read_dataset_info(dataset_dir) -> dict:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise DataError(f"{path} not found: --dataset-dir must hold dataset_info.json registering each dataset "
                        '({"name": {"file_name": ..., "file_sha1": ...}})')
    try:
        info = load_json(path, "fix the file (see data/demo/dataset_info.json)")
    except InputError as e:
        raise DataError(str(e)) from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries, got {type(info).__name__}")
    for name, entry in info.items():
        problem = check_entry(entry)
        if problem:
            raise DataError(f"{path}: entry {name!r} {problem}")
    return info


def check_entry(entry) -> str | None:
    """None when a dataset_info.json entry is well formed, else what is wrong with it and the fix."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        return 'needs a "file_name" string (the data file, relative to the dataset directory)'
    sha1 = entry.get("file_sha1")
    if sha1 is not None and not (isinstance(sha1, str) and re.fullmatch(r"[0-9a-f]{40}", sha1)):
        return (f'has "file_sha1": {json.dumps(sha1)[:60]}, not 40 hex digits; give the file\'s sha1 (sha1sum) or '
                "leave the key out")
    columns = entry.get("columns", {})
    if not isinstance(columns, dict):
        return f'has "columns" as a {type(columns).__name__}; it maps roles to field names: {DEFAULT_COLUMNS}'
    for role, field in columns.items():
        if role not in DEFAULT_COLUMNS:
            return f'has "columns" role {role!r}; the roles are {", ".join(DEFAULT_COLUMNS)}'
        if not (isinstance(field, str) and field or (field is None and role in ("query", "history"))):
            return (f'maps "columns" role {role!r} to {json.dumps(field)[:60]}; give a field name'
                    f'{", or null for none" if role in ("query", "history") else ""}')
    return None


def dataset_file(name: str, dataset_dir, info: dict) -> Path:
    """The registered file of `name`, its sha1 checked when dataset_info.json gives one."""
    if name not in info:
        raise DataError(f"unknown dataset {name!r} in {Path(dataset_dir) / 'dataset_info.json'}; "
                        f"known: {', '.join(sorted(info))}")
    path = Path(dataset_dir) / info[name]["file_name"]
    if not path.is_file():
        raise DataError(f"dataset {name!r}: file {path} not found (named in dataset_info.json)")
    expected = info[name].get("file_sha1")
    if expected:
        got = file_digest(path, "sha1")
        if got != expected:
            raise DataError(f"dataset {name!r}: sha1 of {path} is {got} but dataset_info.json says {expected}; "
                            "the file changed: restore it, or update file_sha1 if the change is intended")
    return path


def read_raw(path: Path) -> list:
    """`.jsonl`: one JSON value per line (blank lines ignored; lines end at "\n" only: U+2028 inside a string is
    text); otherwise one JSON list."""
    try:
        if path.suffix == ".jsonl":
            return load_jsonl(path, "save the file as UTF-8 JSON lines, one record a line")
        rows = parse_json(read_utf8(path, "save the file as UTF-8"), str(path), "fix the JSON there")
    except InputError as e:
        raise DataError(str(e)) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__} "
                        "(use .jsonl for one record per line)")
    return rows


def check_record(raw, columns: dict) -> str | None:
    """None when the record is well formed, else what is wrong with it and the fix."""
    if not isinstance(raw, dict):
        return (f"is a {type(raw).__name__}, not an object; each record must be "
                '{"instruction", "input", "output", "history"}')
    for role in ("prompt", "response"):
        field = columns[role]
        if field not in raw:
            return f"lacks field {field!r}; add it (may be empty to drop the record) or map another field in columns"
    for role in ("prompt", "query", "response"):
        field = columns.get(role)
        if field and raw.get(field) is not None and not isinstance(raw[field], str):
            return f"field {field!r} is a {type(raw[field]).__name__}, expected a string"
    field = columns.get("history")
    history = raw.get(field) if field else None
    if history is not None:
        if not isinstance(history, list):
            return f"field {field!r} is a {type(history).__name__}; history must be a list of [query, answer] pairs"
        for j, turn in enumerate(history):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                return (f"field {field!r} turn {j} is {json.dumps(turn, ensure_ascii=False)[:80]}; "
                        "history must be a list of [query, answer] pairs of strings")
    texts = [(repr(columns[role]), raw.get(columns.get(role) or "", None)) for role in ("prompt", "query", "response")]
    texts += [(f"{field!r} turn {j}", text) for j, turn in enumerate(history or []) for text in turn]
    for where, text in texts:
        hit = reserved_in(text)
        if hit:
            return f"field {where} contains the special token {hit!r}; remove it from the text"
        at = unpaired_surrogate(text)
        if at is not None:
            return (f"field {where} holds half of a UTF-16 pair ({text[at]!r} at character {at}), which is no "
                    "character: the text was cut or escaped wrongly; fix it in the file")
    return None


def unpaired_surrogate(text) -> int | None:
    """Where a JSON escape like "\\ud83d" left a lone UTF-16 surrogate in `text` (no tokenizer takes one), or None."""
    if isinstance(text, str):
        for i, c in enumerate(text):
            if "\ud800" <= c <= "\udfff":
                return i
    return None


def reserved_in(text) -> str | None:
    if isinstance(text, str):
        for s in RESERVED_STRINGS:
            if s in text:
                return s
    return None


def load_records(names: list[str], dataset_dir, max_samples: int | None = None, seed: int | None = 42,
                 skip_bad_records: bool = False) -> tuple[list[dict], dict]:
    """Records of the named datasets -> ([{"prompt", "response", "history", "source"}], report).

    prompt = instruction + input (appended directly, as the study did); history = [[q, a], ...] oldest first;
    source = (dataset name, index in its file). max_samples keeps the FIRST N records of each file (the study's
    `dataset.select(range(N))`), counted before empty records are dropped. Records whose instruction or output is
    empty are dropped and counted, as the study's code did. With an int seed the datasets are concatenated and
    shuffled by `random.Random(seed)`; with seed=None they keep file order.
    """
    info = read_dataset_info(dataset_dir)
    records, report = [], {"datasets": {}}
    for name in names:
        path = dataset_file(name, dataset_dir, info)
        columns = {**DEFAULT_COLUMNS, **info[name].get("columns", {})}
        rows = read_raw(path)
        counts = {"file": str(path), "in_file": len(rows), "read": 0, "kept": 0, "dropped_empty": 0,
                  "skipped_bad": 0}
        report["datasets"][name] = counts
        for i, raw in enumerate(rows[:max_samples] if max_samples is not None else rows):
            counts["read"] += 1
            problem = check_record(raw, columns)
            if problem:
                if not skip_bad_records:
                    raise DataError(f"{path}: record {i} {problem} (or pass --skip-bad-records to skip such records)")
                counts["skipped_bad"] += 1
                continue
            prompt = raw.get(columns["prompt"]) or ""
            response = raw.get(columns["response"]) or ""
            if not prompt or not response:
                counts["dropped_empty"] += 1
                continue
            query = raw.get(columns["query"]) if columns.get("query") else None
            history = raw.get(columns["history"]) if columns.get("history") else None
            records.append({"prompt": prompt + (query or ""), "response": response,
                            "history": [list(t) for t in history or []], "source": (name, i)})
            counts["kept"] += 1
    if seed is not None:
        random.Random(seed).shuffle(records)
    report["records"] = len(records)
    return records, report


def hold_out(records: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """The first n of the seed-shuffled records (load_records with a seed) are the validation records: chosen
    by the seed, whole records (with expand_history all their turns go together). -> (the rest, those n)."""
    if n and n >= len(records):
        fewer = f"hold out fewer (at most {len(records) - 1})" if len(records) > 1 else "give more records"
        raise DataError(f"--val-size {n} holds out {'all' if n == len(records) else 'more than all'} of the "
                        f"{len(records)} training records (after --max-samples and dropping empty ones); "
                        f"{fewer}, or 0 for no validation split")
    return records[n:], records[:n]
