"""What launch.sh asks of the study: its runs and their commands, and what a run still needs; and the demo's checks.

    python -m study commands [IDS]             # every chosen run's commands, for reading (launch.sh --dry-run)
    python -m study plan [IDS]                 # the same for launch.sh: tab-separated lines (below)
    python -m study next NAME [--rerun-stale]  # -> train --resume | train --overwrite | eval | stale | done
    python -m study base-made                  # after --retrain-base: made.json, and is it the committed model?
    python -m study compare [RUNS]             # the demo's runs against the README's table and its measured spread
    python -m study spread REF [NAME DIR SEED ...]  # write that spread (study/expected.py)
    python -m study report [RUNS]              # RUNS/report.html (study/report.py), from the runs as they are

The grid comes from launch.sh's environment (MODEL, DATA_DIR, NPROC, NNODES, NODE_RANK, RDZV_ENDPOINT, RDZV_ID,
PARALLEL, RUNS, SEEDS, TRAIN_EXTRA, EVAL_EXTRA, PY; study/grid.py); `commands` and `plan` also take --retrain-base.
`plan` prints `runs DIR`, `lanes N`, `env K=V ...` (what the commands run under) and `compare 1` where the table can
be compared with the README's; with --retrain-base, `base TRAIN SAVE` and `base_log LOG` (else the demo's base model
is first checked against its made.json); then `run NAME DIR TRAIN EVAL TRAIN_LOG EVAL_LOG` per run ("-": no
command). `next` writes the run's run.json when it has work. A bad id or setting, or a damaged base model, is one
line on stderr, exit 2.
Nothing here imports torch; `compare`, `spread` and `report` read the tables with numpy.
"""
import os
import sys
from pathlib import Path

from runtime.files import reader_gone, write_json

from . import demo_base
from .fingerprint import run_needs
from .grid import DEMO_BASE_RUN, EVAL_SETS, Plan, count
from .rundir import EVAL_LOG, RUN_JSON, TRAIN_LOG, TRAIN_RESULTS


def plan_runs(args: list[str]) -> tuple[Plan, list]:
    ids = []
    for a in args:
        if not a.isdigit() and a != "--retrain-base":
            raise ValueError(f"unknown argument '{a}' (ids are 0-22; --dry-run, --rerun-stale, --retrain-base)")
        ids += [int(a)] if a.isdigit() else []
    plan = Plan.from_env(retrain_base="--retrain-base" in args)
    return plan, plan.runs(ids, count(os.environ, "SEEDS", 1))


def commands(args: list[str]):
    plan, runs = plan_runs(args)
    if plan.cpu_env():
        print("# environment:", " ".join(f"{k}={v}" for k, v in plan.cpu_env().items()))
    if plan.demo:
        print(f"# the demo's base model: {plan.model}; tiny ChatGLM trained on the general-knowledge data by")
        print(*plan.base_model(), sep="\n")
    for run in runs:
        print(f"# {run.row.id}: {run.name}")
        print(*[c for c in (run.train, run.evaluate) if c], sep="\n")


def plan_lines(args: list[str]):
    plan, runs = plan_runs(args)
    if plan.demo and not plan.retrain_base:
        demo_base.check(Path(plan.model))
    print(f"runs\t{plan.runs_dir}\nlanes\t{plan.lanes}")
    print("env\t" + " ".join(f"{k}={v}" for k, v in plan.cpu_env().items()))
    print(f"compare\t{int(plan.comparable())}")
    if plan.retrain_base:
        print("base\t" + "\t".join(plan.base_model()))
        print(f"base_log\t{plan.runs_dir / (DEMO_BASE_RUN + '.log')}")
    for run in runs:
        print("\t".join(("run", run.name, str(run.dir), run.train or "-", run.evaluate, str(run.dir / TRAIN_LOG),
                         str(run.dir / EVAL_LOG))))


def next_step(args: list[str]):
    """Decide what a run needs (study.fingerprint.run_needs); with work to do, (re)write its run.json."""
    if not args or args[1:] not in ([], ["--rerun-stale"]):
        raise ValueError("usage: python -m study next NAME [--rerun-stale]")
    plan, runs = plan_runs([])
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
        write_json(run.dir / RUN_JSON, {**run.record(), "environment": plan.cpu_env()})
    print(what)


def base_made(args: list[str]):
    plan, _ = plan_runs(["--retrain-base"])
    demo_base.record(plan)
    same = demo_base.same_as_committed(Path(plan.model))
    print(f"[launch] the demo's base model, made again in {plan.model}: " +
          ("bit for bit the committed one" if same else f"other bits than the committed {demo_base.DEMO_BASE} "
           "(this machine's code paths, or changed code or data); the runs in this RUNS directory use it"))


def compare(args: list[str]) -> int:
    from . import expected  # reads the tables with numpy: imported only here, so that the dry run needs nothing
    return expected.main(args)


def spread(args: list[str]):
    from . import expected
    if not args or len(args) % 3 != 1:
        raise ValueError("usage: python -m study spread REF_RUNS [NAME RUNS SEED ...]")
    combinations = [(args[i], Path(args[i + 1]), int(args[i + 2])) for i in range(1, len(args), 3)]
    write_json(expected.EXPECTED, expected.spread(Path(args[0]), combinations))


def report(args: list[str]):
    from .report import write_report  # imports numpy and matplotlib: only here
    from .results import read_runs
    if len(args) > 1:
        raise ValueError("usage: python -m study report [RUNS]")
    runs_dir = Path(args[0] if args else "runs")
    runs = read_runs(runs_dir, list(EVAL_SETS))
    if not runs:
        raise ValueError(f"{runs_dir}: no */run.json; launch.sh writes one per run")
    print(write_report(runs_dir, runs, list(EVAL_SETS), top=1))


if __name__ == "__main__":
    verbs = {"commands": commands, "plan": plan_lines, "next": next_step, "base-made": base_made,
             "compare": compare, "spread": spread, "report": report}
    if len(sys.argv) < 2 or sys.argv[1] not in verbs:
        sys.exit(f"usage: python -m study {{{','.join(verbs)}}} ...")
    try:
        sys.exit(verbs[sys.argv[1]](sys.argv[2:]))
    except ValueError as e:
        print(f"{'launch.sh' if sys.argv[1] in ('commands', 'plan', 'next') else 'python -m study'}: {e}",
              file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `launch.sh --dry-run | head`
        reader_gone()
