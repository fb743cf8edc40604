"""What a number depends on, as short hashes, so that a result made by other code or for another adapter is
recognised instead of being shown as current.

    code      our code (the scripts at the root and every package beside them: code_files) and the versions
              of the libraries it runs on
    data      the dataset files read and their dataset_info.json entries
    adapter   sha256 of each file that loading the run's adapter reads
    settings  the arguments that decide the numbers

train.py writes {"code", "data", "settings"} into train_results.json, evaluate.py {"code", "data", "adapter",
"settings"} into every metrics.json, both with the git commit. results.py marks rows whose code differs from this
checkout; launch.sh asks, per run (python -m study next NAME): run_needs -> train | eval | stale | done.

Imports no torch: the launcher asks once per run.
"""
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from runtime.files import digest, file_digest, read_json

from .grid import EVAL_SETS
from .rundir import RUN_JSON, TRAIN_RESULTS, RunFileError, set_metrics

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "numpy", "sentencepiece", "safetensors", "jieba", "rouge-chinese", "nltk")


def code_files(root: Path = REPO) -> list[Path]:
    """The code a number can depend on: the Python scripts at the root and the modules of every package beside
    them (a folder with __init__.py: model, adapters, data, runtime, study), not their subfolders (data/demo's
    generator: the data fingerprint covers what it made). Not bench/ or tests/ (no __init__.py)."""
    packages = [p.parent for p in Path(root).glob("*/__init__.py")]
    return sorted([*Path(root).glob("*.py"), *(f for pkg in packages for f in pkg.glob("*.py"))])


def library_versions() -> dict:
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_fingerprint(root: Path = REPO) -> str:
    """The code files' contents (by path relative to `root`) and the library versions."""
    return digest({"files": {p.relative_to(root).as_posix(): file_digest(p) for p in code_files(root)},
                   "versions": library_versions()})


def data_fingerprint(dataset_dir, names) -> str:
    """The registered files of `names` in `dataset_dir` and their dataset_info.json entries."""
    from data.registry import dataset_file, read_dataset_info
    info = read_dataset_info(dataset_dir)
    return digest({n: [info.get(n), file_digest(dataset_file(n, dataset_dir, info))] for n in names})


def adapter_sha256(adapter_dir) -> dict:
    """name -> sha256 of the files that loading the adapter reads (adapters/files.py: read_adapter, whose choice this
    repeats without importing torch): its settings, adapter.json (else PEFT's adapter_config.json), and its weights,
    adapter_model.safetensors (else adapter_model.bin); without either settings file, every .bin and .safetensors
    file (reference P-Tuning weights: the first holding the prefix encoder is read). Files a user adds beside them
    (python -m adapters --peft-bin's copy, notes) do not change the numbers, so they do not make the scores stale."""
    d = Path(adapter_dir)
    settings = next((d / n for n in ("adapter.json", "adapter_config.json") if (d / n).is_file()), None)
    if settings is None:
        files = sorted(p for p in d.iterdir() if p.suffix in (".bin", ".safetensors") and p.is_file())
    else:
        weights = [d / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (d / n).is_file()]
        files = [settings, *weights[:1]]
    return {p.name: file_digest(p) for p in files}


def scored_with(recorded: dict | None, adapter: dict | None) -> bool:
    """Whether scores recorded for the adapter files `recorded` (metrics.json's adapter.sha256; None: the base
    model) are for `adapter` (adapter_sha256 now). Records written before adapter_sha256 hashed only the files read
    list every adapter* file of the directory, a superset: only the names read now are compared, so such a record
    stays current while those files are unchanged, whatever else it lists."""
    if recorded is None or adapter is None or not isinstance(recorded, dict):
        return recorded == adapter
    return {name: recorded.get(name) for name in adapter} == adapter


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


def other_code(record: dict | None, code: str) -> bool:
    """True when a train_results.json / metrics.json was made by other code (or before fingerprints existed)."""
    fingerprint = record.get("fingerprint") if isinstance(record, dict) else None
    return not isinstance(fingerprint, dict) or fingerprint.get("code") != code


def run_needs(run_dir: Path, rerun_stale: bool = False, code: str | None = None) -> str:
    """What a launcher run directory still needs, by launch.sh's layout (run.json, eval/<set>/metrics.json):
    'train' (no finished training, or --rerun-stale and it was made by other code), 'eval' (a set has no metrics,
    the adapter changed since it was scored, or --rerun-stale and the scores were made by other code), 'stale'
    (finished, by other code) or 'done'."""
    code = code or code_fingerprint()
    trained = (run_dir / "adapter.json").is_file() or (run_dir / "adapter_config.json").is_file()
    run = read_json(run_dir / RUN_JSON)
    base_row = isinstance(run, dict) and run.get("method") == "none"
    train = None if base_row else read_json(run_dir / TRAIN_RESULTS)
    train = train if isinstance(train, dict) else None  # missing, or edited into something else: train again
    if not base_row and (train is None or not trained or (rerun_stale and other_code(train, code))):
        return "train"
    try:
        scores = [set_metrics(run_dir, name) for name in EVAL_SETS]
    except RunFileError:  # damaged: evaluated again
        return "eval"
    if any(m is None for m in scores):
        return "eval"
    adapter = None if base_row else adapter_sha256(run_dir)
    if not all(scored_with(m["adapter"].get("sha256") if isinstance(m.get("adapter"), dict) else None, adapter)
               for m in scores):
        return "eval"
    if made_by_other_code(train, scores, code):
        return "eval" if rerun_stale else "stale"
    return "done"


def made_by_other_code(train: dict | None, scores: list[dict | None], code: str) -> bool:
    """A run's numbers came from other code when its training (None: no training) or any of its scores did."""
    return (train is not None and other_code(train, code)) or any(other_code(m, code) for m in scores if m)

