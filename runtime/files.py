"""Files every part writes and reads: JSON, text and directories replaced atomically, JSON lines, and the
digests that identify files and settings.

A reader never sees half a file: text goes to `<name>.tmp` and is renamed over the target; a directory
is built under a temporary name and swapped in by `replace_dir`; JSON lines are appended a whole line at a
time. A write that fails is an OSError naming the path (`writing`), and `explain` turns it into the one line
the scripts print.
"""
import errno
import hashlib
import json
import math
import os
import shutil
import sys
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


class InputError(ValueError):
    """A file the user gave is not what it should be: the message names the file, the key or record, and the fix.
    Every reader raises it (data.registry's DataError is one); the scripts print it as one line."""


def parse_json(text: str, where: str, fix: str, first_line: int = 1):
    """JSON text (starting at line `first_line` of its file) -> its value; what Python's parser cannot take (a
    syntax error, nesting deeper than the recursion limit, an integer past the digit limit) is an InputError
    saying `where` and `fix`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON at line {e.lineno + first_line - 1}, column {e.colno}: {e.msg}; "
                         f"{fix}") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read (line {first_line}); {fix}") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError(f"{where}: {str(e).split(';')[0]} (line {first_line}); {fix}") from None


def read_utf8(path, fix: str) -> str:
    """A text file's content; a file that is missing, a directory or not UTF-8 is an InputError naming the file,
    the byte and its line, and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'a directory, not a file' if path.is_dir() else 'missing'}; {fix}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}, line {line}: {data[e.start:e.end]!r}); "
                         f"{fix}") from None


def load_json(path, fix: str):
    """A JSON file a user may have edited or another tool written -> its value, or an InputError naming the file,
    what is wrong with it and `fix`."""
    return parse_json(read_utf8(path, fix), str(path), fix)


def load_jsonl(path, fix: str) -> list:
    """A JSON-lines file a user may have edited -> its values, one a line (blank lines skipped; lines end at "\n"
    only: U+2028 inside a string is text), or an InputError naming the file and the line, and `fix`. (read_jsonl is
    the lenient reader of files this code appends to, where a kill may have cut the last line short.)"""
    return [parse_json(line, str(path), fix, i) for i, line in enumerate(read_utf8(path, fix).split("\n"), 1)
            if line.strip()]


def real_number(value) -> bool:
    """A finite int or float read from JSON (true and false are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path) -> dict | None:
    """A JSON file's content, or None where it is missing or unreadable (a result not written yet)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def read_jsonl(path) -> list[dict]:
    """Records of a jsonl file, decoded line by line: a line cut short by an interrupted write (a kill, a full
    disk: even in the middle of a character) is left out. Lines end at "\n" only (U+2028 is text)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError):  # json.JSONDecodeError, UnicodeDecodeError, nesting
                continue
    return out


def write_jsonl(path, rows: list[dict]):
    """Atomic, like write_text: one record per line."""
    write_text(path, "".join(jsonl_line(r) for r in rows))


def append_jsonl(path, rows: list[dict]):
    """Whole lines in one write, flushed to disk: a file that survives a kill up to its last whole line. A line an
    interrupted write left unfinished is cut off first (drop_torn_tail), so the file holds whole records only."""
    drop_torn_tail(path)
    with open(path, "ab") as f:
        f.write("".join(jsonl_line(r) for r in rows).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path) -> bool:
    """Cut off the end of a file that is not a whole line (what a kill or a full disk leaves in the middle of a
    write); -> whether there was one. A missing file has none."""
    try:
        with open(path, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return False
            f.seek(end - 1)
            if f.read(1) == b"\n":  # the common case: the last byte alone is read
                return False
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)
            return True
    except FileNotFoundError:
        return False


def digest(content, algorithm: str = "sha256", length: int = 16) -> str:
    """The first `length` hex digits of the hash of `content`: bytes as they are, anything else as canonical
    JSON (sorted keys), so that equal settings give equal digests."""
    if not isinstance(content, bytes):
        content = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.new(algorithm, content).hexdigest()[:length]


def file_digest(path, algorithm: str = "sha256") -> str:
    """The whole hex digest of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


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


def reader_gone():
    """After a BrokenPipeError on stdout (`... | head` read what it wanted): point stdout at /dev/null, so that
    Python's flush at exit raises no second error. The script then ends quietly."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None
