"""Files every part writes: JSON, text and directories replaced atomically, append-only JSON lines.

A reader never sees half a file: text goes to `<name>.tmp` and is renamed over the target; a directory
is built under a temporary name and swapped in by `replace_dir`. A write that fails is an OSError naming the
path (`writing`), and `explain` turns it into the one line the scripts print.
"""
import errno
import json
import os
import shutil
from contextlib import contextmanager
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


@contextmanager
def writing(path):
    """Whatever fails inside failed to write `path`: torch.save and safetensors report a full disk as their own
    errors ("unexpected pos", SafetensorError); they become an OSError that names the path."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        raise OSError(errno.EIO, f"writing failed ({e})", str(path)) from e


def explain(e: OSError) -> str:
    """One line for a failed file operation: the path, the reason, what to do."""
    path = Path(e.filename) if e.filename else None
    free = free_bytes(path) if path else None
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "not writable: choose another output directory or fix its permissions"
    elif e.errno == errno.ENOSPC or (free is not None and free < 16 * 2**20):
        hint = f"the disk is full ({(free or 0) / 2**20:.0f} MiB free): free space or choose another output directory"
    else:
        hint = "check the path and the disk"
    return f"{path or 'a file'}: {e.strerror or e}; {hint}"


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None
