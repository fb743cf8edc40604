"""A run directory: every file name in it (what train.py, evaluate.py and launch.sh write), and reading a run's
scores and answers, checked. Imports no torch: `python -m study next` reads it once per run.

    run.json                 launch.sh's runs: the grid row and the commands that made it (study/grid.py)
    run_config.json          train.py: every argument, world size, seed, library versions, git commit
    trainer_log.jsonl        one line per --logging-steps: step, epoch, loss, lr, grad_norm, tokens_per_s;
                             with validation, one per --eval-steps: step, epoch, val_loss
    train_results.json       at the end
    training_loss.png        with --plot-loss
    events.out.tfevents.*    with --tensorboard: trainer_log.jsonl's numbers for `tensorboard --logdir runs`
    adapter.json, adapter_model.safetensors, ...    the final adapter (adapters/files.py names them)
    checkpoints/step-N/      the training state to resume from (runtime/checkpoint.py names what is inside)
    train.log, eval.log      launch.sh's logs of the two commands
    eval/<set>/              evaluate.py's output for one evaluation set (--output-dir DIR: DIR/<set>/):
        generated_predictions.jsonl, scores.jsonl, metrics.json
        generated_predictions.partial-<key>.rank<r>.jsonl     an interrupted evaluation's finished batches
"""
from pathlib import Path

from runtime.files import InputError, load_jsonl, read_json

RUN_JSON = "run.json"
RUN_CONFIG = "run_config.json"
LOG = "trainer_log.jsonl"
TRAIN_RESULTS = "train_results.json"
LOSS_PLOT = "training_loss.png"
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # torch.utils.tensorboard.SummaryWriter names its files so
CHECKPOINTS = "checkpoints"
TRAIN_LOG, EVAL_LOG = "train.log", "eval.log"
EVAL = "eval"
PREDICTIONS, SCORES, METRICS = "generated_predictions.jsonl", "scores.jsonl", "metrics.json"


def partial_predictions(key: str, rank: int | str) -> str:
    """The file of an unfinished evaluation's batches on one rank ("*": every rank's)."""
    return f"generated_predictions.partial-{key}.rank{rank}.jsonl"


REEVALUATE = "evaluate.py writes this file: evaluate again"  # the fix for a broken scores or predictions file


class RunFileError(InputError):
    """A file of a run that is there but cannot be used (cut short, edited): the message names it and the fault."""


def set_metrics(run_dir: Path, dataset: str, numbers=()) -> dict | None:
    """A run's metrics.json for one evaluation set, or None where it has none (yet). Every value with an interval
    and each of `numbers` present (the scores the table shows) must be a number, an interval two numbers, else
    RunFileError."""
    path = Path(run_dir) / EVAL / dataset / METRICS
    if not path.is_file():
        return None
    m = read_json(path)
    if not isinstance(m, dict) or not isinstance(m.get("interval", {}), dict):
        raise RunFileError(f"{path}: not a metrics.json that evaluate.py writes (cut short or edited)")
    bad = [k for k, bounds in m.get("interval", {}).items()
           if not (is_number(m.get(k)) and isinstance(bounds, list) and len(bounds) == 2
                   and all(map(is_number, bounds)))]
    bad += [k for k in numbers if m.get(k) is not None and not is_number(m[k]) and k not in bad]
    if bad:
        raise RunFileError(f"{path}: {', '.join(bad)}: not a number with an interval of two numbers")
    return m


def set_scores(run_dir: Path, dataset: str) -> list[dict] | None:
    """A run's per-sample scores for one evaluation set (an integer "index" and numbers per line), or None where it
    has none (yet); RunFileError where a line is not such a row."""
    path = Path(run_dir) / EVAL / dataset / SCORES
    return read_scores(path) if path.is_file() else None


def evaluation_lines(path: Path) -> list:
    """The lines of a JSON-lines file evaluate.py wrote (load_jsonl); its faults as RunFileError."""
    try:
        return load_jsonl(path, REEVALUATE)
    except InputError as e:
        raise RunFileError(str(e)) from None


def read_scores(path: Path) -> list[dict]:
    """scores.jsonl: an integer "index" and numbers per line; RunFileError where a line is not such a row."""
    rows = evaluation_lines(path)
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("index"), int) and all(map(is_number, row.values()))):
            raise RunFileError(f"{path}: row {i} is not a sample's index and scores (cut short or edited); "
                               f"{REEVALUATE}")
    return rows


def set_predictions(run_dir: Path, dataset: str) -> list[dict] | None:
    """A run's answers for one evaluation set (read_predictions), or None where it has none (yet)."""
    path = Path(run_dir) / EVAL / dataset / PREDICTIONS
    return read_predictions(path) if path.is_file() else None


def read_predictions(path: Path) -> list[dict]:
    """A finished generated_predictions.jsonl, every line a record with an integer "index" and the "prompt",
    "label" and "predict" strings (more keys are kept); RunFileError naming the line where one is not. (An
    unfinished evaluation's partial files are read leniently instead: a line a kill cut short is generated again.)"""
    records = evaluation_lines(path)
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("index"), int)
                and all(isinstance(r.get(k), str) for k in ("prompt", "label", "predict"))):
            raise RunFileError(f"{path}: record {i} is not a sample's index, prompt, label and answer (cut short or "
                               f"edited); {REEVALUATE}")
    if not records:
        raise RunFileError(f"{path}: no prediction records (generated_predictions.jsonl lines with 'index', "
                           f"'prompt', 'label' and 'predict'); {REEVALUATE}")
    return records


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
