"""The demo's base model as a file: its record (`made.json`: the commands that made it, the machine, the sha256 of
each file) and the check that a committed or retrained copy is whole. Torch-free, like the rest of launch.sh's part.
"""
import platform
from pathlib import Path

from runtime.files import file_digest, read_json, write_json
from runtime.machine import cpu_model

from .fingerprint import library_versions
from .grid import DEMO_BASE, MADE, Plan


def record(plan: Plan) -> dict:
    """made.json for the model just exported to plan.model: how it was made and the digest of each of its files."""
    model = Path(plan.model)
    made = {"commands": list(plan.base_model()), "environment": plan.cpu_env(), "cpu": cpu_model(),
            "machine": platform.machine(), "torch": library_versions()["torch"],
            "files": {p.name: file_digest(p) for p in sorted(model.iterdir()) if p.is_file() and p.name != MADE}}
    write_json(model / MADE, made)
    return made


def check(model: Path):
    """Raises ValueError naming the file and the fix where a file of the base model differs from its made.json."""
    made = read_json(model / MADE)
    fix = (f"`git checkout {DEMO_BASE}`" if model == DEMO_BASE else f"delete {model}") + \
        ", or make it again: bash launch.sh --retrain-base"
    if made is None:
        raise ValueError(f"{model / MADE}: missing or unreadable (the demo's base model is checked against it); {fix}")
    for name, sha in made["files"].items():
        got = file_digest(model / name) if (model / name).is_file() else "missing"
        if got != sha:
            raise ValueError(f"{model / name}: sha256 {got[:16]}, {MADE} says {sha[:16]}: damaged or replaced "
                             f"(a Git LFS pointer, an interrupted copy?); {fix}")


def same_as_committed(model: Path) -> bool:
    """Whether a retrained base model has the committed one's weights, bit for bit."""
    ours, committed = read_json(model / MADE), read_json(DEMO_BASE / MADE)
    return bool(ours and committed) and ours["files"] == committed["files"]
