"""What launch.sh asks of the study: its runs and their commands, and what a run still needs.

    python -m study commands [IDS]             # every chosen run's commands, for reading (launch.sh --dry-run)
    python -m study plan [IDS]                 # the same for launch.sh: tab-separated lines (below)
    python -m study next NAME [--rerun-stale]  # -> train --resume | train --overwrite | eval | stale | done

The grid comes from launch.sh's environment (MODEL, DATA_DIR, NPROC, PARALLEL, RUNS, SEEDS, TRAIN_EXTRA,
EVAL_EXTRA, PY; study/grid.py). `plan` prints `runs DIR` and `lanes N`; where the demo's base model is still to be
made, `base TRAIN SAVE` and `base_log LOG`; then `run NAME DIR TRAIN EVAL TRAIN_LOG EVAL_LOG` per run ("-": no
command). `next` writes the run's run.json when it has work. A bad id or setting is one line on stderr, exit 2.
Nothing here imports torch.
"""
import os
import sys
from pathlib import Path

from runtime.files import write_json

from .fingerprint import run_needs
from .grid import DEMO_BASE_RUN, Plan, count
from .rundir import EVAL_LOG, RUN_JSON, TRAIN_LOG, TRAIN_RESULTS


def plan_runs(args: list[str]) -> tuple[Plan, list]:
    ids = []
    for a in args:
        if not a.isdigit():
            raise ValueError(f"unknown argument '{a}' (ids are 0-22; --dry-run, --rerun-stale)")
        ids.append(int(a))
    plan = Plan.from_env()
    return plan, plan.runs(ids, count(os.environ, "SEEDS", 1))


def commands(args: list[str]):
    plan, runs = plan_runs(args)
    if plan.demo:
        print("# base model for the demo: tiny ChatGLM trained on the general-knowledge data")
        print(*plan.base_model(), sep="\n")
    for run in runs:
        print(f"# {run.row.id}: {run.name}")
        print(*[c for c in (run.train, run.evaluate) if c], sep="\n")


def plan_lines(args: list[str]):
    plan, runs = plan_runs(args)
    print(f"runs\t{plan.runs_dir}\nlanes\t{plan.lanes}")
    if plan.demo and not (Path(plan.model) / "config.json").is_file():  # the demo's base model is not made yet
        print("base\t" + "\t".join(plan.base_model()))
        print(f"base_log\t{plan.runs_dir / (DEMO_BASE_RUN + '.log')}")
    for run in runs:
        print("\t".join(("run", run.name, str(run.dir), run.train or "-", run.evaluate, str(run.dir / TRAIN_LOG),
                         str(run.dir / EVAL_LOG))))


def next_step(args: list[str]):
    """Decide what a run needs (study.fingerprint.run_needs); with work to do, (re)write its run.json."""
    if not args or args[1:] not in ([], ["--rerun-stale"]):
        raise ValueError("usage: python -m study next NAME [--rerun-stale]")
    _, runs = plan_runs([])
    run = next((r for r in runs if r.name == args[0]), None)
    if run is None:
        raise ValueError(f"{args[0]}: no run of this grid has that name")
    what = run_needs(run.dir, rerun_stale=len(args) == 2)
    if what == "train":
        # a run finished by other code starts over; anything else continues from its latest checkpoint
        what = "eval" if not run.train else "train --overwrite" if (run.dir / TRAIN_RESULTS).is_file() \
            else "train --resume"
    if what not in ("done", "stale"):
        run.dir.mkdir(parents=True, exist_ok=True)
        write_json(run.dir / RUN_JSON, run.record())
    print(what)


if __name__ == "__main__":
    verbs = {"commands": commands, "plan": plan_lines, "next": next_step}
    if len(sys.argv) < 2 or sys.argv[1] not in verbs:
        sys.exit(f"usage: python -m study {{{','.join(verbs)}}} ...")
    try:
        verbs[sys.argv[1]](sys.argv[2:])
    except ValueError as e:
        print(f"launch.sh: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `launch.sh --dry-run | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
