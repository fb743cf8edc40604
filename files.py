"""Files every part writes: JSON, text and directories replaced atomically, append-only JSON lines.

A reader never sees half a file: text goes to `<name>.tmp` and is renamed over the target; a directory
is built under a temporary name and swapped in by `replace_dir`.
"""
import json
import os
import shutil
from pathlib import Path


def write_text(path, text: str):
    """Atomic: the old file stays whole until the new one is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list[dict]:
    """Records of a jsonl file; a line cut short by an interrupted write is ignored."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def append_jsonl(path, row: dict):
    """One line, flushed to disk: a log that survives a kill up to its last whole line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def replace_dir(tmp: Path, out_dir: Path):
    """Swap a finished temp directory into place; the old one is removed only after the rename."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
