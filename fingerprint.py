"""What a number depends on, as short hashes, so that a result made by other code or for another adapter is
recognised instead of being shown as current.

    code      our code that computes a number (the files in CODE) and the versions of the libraries it runs on
    data      the dataset files read and their dataset_info.json entries
    adapter   sha256 of each adapter file of the run directory
    settings  the arguments that decide the numbers

train.py writes {"code", "data", "settings"} into train_results.json, evaluate.py {"code", "data", "adapter",
"settings"} into every metrics.json, both with the git commit. results.py marks rows whose code differs from this
checkout; launch.sh asks, per run:

    python -m fingerprint RUN_DIR [--rerun-stale]   # -> train | eval | stale | done

Imports no torch: the launcher calls it once per run.
"""
import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent
# Files whose change can change a trained weight, a generated token or a score. Not results.py (it only formats)
# nor the benches and tests.
CODE = ("model/*.py", "adapters/*.py", "data/*.py", "train.py", "rundir.py", "runtime.py", "files.py",
        "evaluate.py", "metrics.py", "stats.py")
LIBRARIES = ("torch", "numpy", "sentencepiece", "safetensors", "jieba", "rouge-chinese", "nltk")
EVAL_SETS = ("roleplay_all_test", "alpaca_gpt4_zh")  # launch.sh's evaluation sets


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def library_versions() -> dict:
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_fingerprint(root: Path = REPO) -> str:
    """The CODE files' contents (by path relative to `root`) and the library versions."""
    files = sorted(p for pattern in CODE for p in Path(root).glob(pattern))
    return short_hash({"files": {p.relative_to(root).as_posix(): file_sha256(p) for p in files},
                       "versions": library_versions()})


def data_fingerprint(dataset_dir, names) -> str:
    """The registered files of `names` in `dataset_dir` and their dataset_info.json entries."""
    from data.registry import dataset_file, read_dataset_info
    info = read_dataset_info(dataset_dir)
    return short_hash({n: [info.get(n), file_sha256(dataset_file(n, dataset_dir, info))] for n in names})


def adapter_sha256(checkpoint_dir) -> dict:
    """name -> sha256 of every adapter file (adapter.json, adapter_model.*, adapter_config.json) of a run."""
    files = sorted(p for p in Path(checkpoint_dir).iterdir() if p.name.startswith("adapter") and p.is_file())
    return {p.name: file_sha256(p) for p in files}


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD of this checkout, whether tracked files differ from it); (None, None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def other_code(record: dict | None, code: str) -> bool:
    """True when a train_results.json / metrics.json was made by other code (or before fingerprints existed)."""
    return (record or {}).get("fingerprint", {}).get("code") != code


def run_needs(run_dir: Path, rerun_stale: bool = False, code: str | None = None) -> str:
    """What a launcher run directory still needs, by launch.sh's layout (run.json, eval/<set>/metrics.json):
    'train' (no finished training, or --rerun-stale and it was made by other code), 'eval' (a set has no metrics,
    the adapter changed since it was scored, or --rerun-stale and the scores were made by other code), 'stale'
    (finished, by other code) or 'done'."""
    code = code or code_fingerprint()
    trained = (run_dir / "adapter.json").is_file() or (run_dir / "adapter_config.json").is_file()
    base_row = (read_json(run_dir / "run.json") or {}).get("method") == "none"
    train = None if base_row else read_json(run_dir / "train_results.json")
    if not base_row and (train is None or not trained or (rerun_stale and other_code(train, code))):
        return "train"
    scores = [read_json(run_dir / "eval" / name / "metrics.json") for name in EVAL_SETS]
    if any(m is None for m in scores):
        return "eval"
    adapter = None if base_row else adapter_sha256(run_dir)
    if any((m.get("checkpoint") or {}).get("sha256") != adapter for m in scores):
        return "eval"
    if made_by_other_code(train, scores, code):
        return "eval" if rerun_stale else "stale"
    return "done"


def made_by_other_code(train: dict | None, scores: list[dict | None], code: str) -> bool:
    """A run's numbers came from other code when its training (None: no training) or any of its scores did."""
    return (train is not None and other_code(train, code)) or any(other_code(m, code) for m in scores if m)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--rerun-stale"):
        sys.exit("usage: python -m fingerprint RUN_DIR [--rerun-stale]")
    print(run_needs(Path(sys.argv[1]), rerun_stale=len(sys.argv) == 3))
