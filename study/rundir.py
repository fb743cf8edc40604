"""A run directory: every file name in it (what train.py, evaluate.py and launch.sh write), and reading a run's
scores. Imports no torch: `python -m study next` reads it once per run.

    run.json                 launch.sh's runs: the grid row and the commands that made it (study/grid.py)
    run_config.json          train.py: every argument, world size, seed, library versions, git commit
    trainer_log.jsonl        one line per --logging-steps: step, epoch, loss, lr, grad_norm, tokens_per_s;
                             with validation, one per --eval-steps: step, epoch, val_loss
    train_results.json       at the end
    training_loss.png        with --plot-loss
    adapter.json, adapter_model.safetensors, ...    the final adapter (adapters/files.py names them)
    checkpoints/step-N/      the training state to resume from (runtime/checkpoint.py names what is inside)
    train.log, eval.log      launch.sh's logs of the two commands
    eval/<set>/              evaluate.py's output for one evaluation set (--output-dir DIR: DIR/<set>/):
        generated_predictions.jsonl, scores.jsonl, metrics.json
        generated_predictions.partial-<key>.rank<r>.jsonl     an interrupted evaluation's finished batches
"""
from pathlib import Path

from runtime.files import read_json, read_jsonl

RUN_JSON = "run.json"
RUN_CONFIG = "run_config.json"
LOG = "trainer_log.jsonl"
TRAIN_RESULTS = "train_results.json"
LOSS_PLOT = "training_loss.png"
CHECKPOINTS = "checkpoints"
TRAIN_LOG, EVAL_LOG = "train.log", "eval.log"
EVAL = "eval"
PREDICTIONS, SCORES, METRICS = "generated_predictions.jsonl", "scores.jsonl", "metrics.json"


def partial_predictions(key: str, rank: int | str) -> str:
    """The file of an unfinished evaluation's batches on one rank ("*": every rank's)."""
    return f"generated_predictions.partial-{key}.rank{rank}.jsonl"


def set_metrics(run_dir: Path, dataset: str) -> dict | None:
    """A run's metrics.json for one evaluation set, or None where it has none (yet)."""
    return read_json(Path(run_dir) / EVAL / dataset / METRICS)


def set_scores(run_dir: Path, dataset: str) -> list[dict] | None:
    """A run's per-sample scores for one evaluation set, or None where it has none (yet)."""
    path = Path(run_dir) / EVAL / dataset / SCORES
    return read_jsonl(path) if path.is_file() else None
