"""The study's grid as data (../shared/docs/experiment.md), the demo that runs it on a CPU, and the commands
of every run: launch.sh asks for them (`python -m study`), train.py and evaluate.py take their defaults here.

A row is a run id with its method, target, layers and auxiliary set. Id 0 is the base model, evaluated only;
ids 1-22 are trained on the role-play set (with the auxiliary chat set where `aux`), then every row is
evaluated on EVAL_SETS, EVAL_SAMPLES samples each. Layers are named for any depth: "last3" (25-27 on
ChatGLM-6B), "first3" (0-2), "all".

Plain Python, no torch: launch.sh's dry run prints the commands on a machine without PyTorch.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from model.config import ChatGLMConfig
from runtime.machine import has_avx2

from .rundir import EVAL


@dataclass(frozen=True)
class Row:
    id: int
    method: str  # "none": the base model
    target: str = "-"
    layers: str = "-"  # last3, first3, all; "-" for the base model and P-Tuning (every layer)
    aux: bool = False


GRID = (
    Row(0, "none"),
    Row(1, "freeze", "mlp", "last3"), Row(2, "freeze", "mlp", "last3", True),
    Row(3, "freeze", "mlp", "first3"), Row(4, "freeze", "mlp", "first3", True),
    Row(5, "freeze", "qkv", "last3"), Row(6, "freeze", "qkv", "last3", True),
    Row(7, "freeze", "qkv", "first3"), Row(8, "freeze", "qkv", "first3", True),
    Row(9, "ptuning"), Row(10, "ptuning", aux=True),
    Row(11, "lora", "mlp", "last3"), Row(12, "lora", "mlp", "last3", True),
    Row(13, "lora", "mlp", "first3"), Row(14, "lora", "mlp", "first3", True),
    Row(15, "lora", "mlp", "all"), Row(16, "lora", "mlp", "all", True),
    Row(17, "lora", "qkv", "last3"), Row(18, "lora", "qkv", "last3", True),
    Row(19, "lora", "qkv", "first3"), Row(20, "lora", "qkv", "first3", True),
    Row(21, "lora", "qkv", "all"), Row(22, "lora", "qkv", "all", True),
)
TRAIN_SET = "roleplay_all_train"
AUX_SET, AUX_MAX_SAMPLES = "chat_aux_zh", 10000  # the study's auxiliary set: 10,000 samples of chat
EVAL_SETS = ("roleplay_all_test", "alpaca_gpt4_zh")
EVAL_SAMPLES = 100  # the first 100 of each evaluation set
DEFAULT_SEED = 42  # train.py's and evaluate.py's --seed: its runs keep the plain name
STUDY_DATA = Path("../shared/data")  # the study's data directory beside the repository, where a clone has it

# With MODEL (ChatGLM-6B): the study's settings are train.py's defaults (lr 1e-5, 10 epochs, cosine, batch 8,
# bf16 on a GPU); a checkpoint every 30 minutes of training for a resume after Ctrl-C; 200 training records held
# out for a validation loss every 500 steps.
STUDY_TRAIN = "--save-minutes 30 --val-size 200 --eval-steps 500"
STUDY_EVAL = ""

# The demo (no MODEL): a tiny ChatGLM (the `tiny` preset) trained on the bundled general-knowledge and chat data
# (DEMO_BASE_TRAIN), committed as DEMO_BASE, then fine-tuned by every row on the bundled role-play data, two runs
# side by side on a 2-core CPU. The demo's model learns in minutes only with larger steps than the 6B study's 1e-5:
# train.py takes DEMO_SETTINGS as its defaults on this model. A validation loss on 100 held-out records every
# 50 of the ~240 steps; a checkpoint every 2 minutes of training.
DEMO_PRESET = "tiny"
DEMO_DATA = Path("data/demo")
DEMO_SETTINGS = "--lr 2e-3 --epochs 2 --batch-size 16 --precision fp32"
DEMO_TRAIN = DEMO_SETTINGS + " --logging-steps 20 --save-steps 0 --save-minutes 2 --val-size 100 --eval-steps 50"
DEMO_EVAL = "--batch-size 100 --precision fp32"
DEMO_BASE_TRAIN = (f"--model {DEMO_PRESET} --method full --dataset alpaca_gpt4_zh,chat_aux_zh --lr 3e-3 --epochs 12 "
                   "--batch-size 16 --precision fp32 --warmup-steps 50 --logging-steps 50 --save-steps 0 "
                   "--save-minutes 2")
# The demo's base model is committed, so that every clone fine-tunes the same weights: DEMO_BASE, with MADE (the
# commands that made it, where, and the sha256 of each file). `bash launch.sh --retrain-base` makes it again in
# RUNS/DEMO_MODEL (from a run in RUNS/DEMO_BASE_RUN); a RUNS directory that holds one uses it instead.
DEMO_BASE = DEMO_DATA / "base-model"
DEMO_MODEL = "base-model"
DEMO_BASE_RUN = "base-train"
MADE = "made.json"
# The demo's CPU code paths, pinned: one thread per run, PyTorch's AVX2 kernels and MKL's AVX2 branch. So pinned,
# a run is the same bits whether the x86-64 CPU has AVX2 or AVX-512 and however many cores (BENCHMARKS.md, "The
# demo on other machines"). ATEN_CPU_CAPABILITY or MKL_CBWR set by the user win; CPUs without AVX2 (or where
# /proc/cpuinfo does not say: macOS) keep their own paths, and get numbers within the measured spread.
DEMO_THREADS = {"OMP_NUM_THREADS": "1"}
DEMO_X86 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
LANES = {"study": 1, "demo": 2}  # runs side by side by default: the demo's two on the two cores of a CPU


def layer_range(layers: str, depth: int) -> str:
    """A row's layers as --layers takes them, for a model of `depth` layers: last3 -> '25-27' on ChatGLM-6B."""
    return {"last3": f"{depth - 3}-{depth - 1}", "first3": "0-2", "all": f"0-{depth - 1}", "-": "-"}[layers]


@dataclass(frozen=True)
class Run:
    """One row of the grid with one seed, on one model: its directory and its two commands ("" for none)."""
    row: Row
    seed: int
    layers: str  # explicit range on this model's depth, or "-"
    name: str
    dir: Path
    train: str
    evaluate: str

    def record(self) -> dict:
        """run.json: what the table says of the run, and the commands that made it."""
        return {"id": self.row.id, "name": self.name, "method": self.row.method, "target": self.row.target,
                "layers": self.layers, "aux": self.row.aux, "seed": self.seed,
                "commands": [c for c in (self.train, self.evaluate) if c]}


@dataclass(frozen=True)
class Plan:
    """The grid on one model and dataset directory, from launch.sh's environment (its header lists the knobs)."""
    demo: bool
    model: str
    data_dir: str
    runs_dir: Path
    depth: int
    py: str  # the Python that runs the scripts
    nproc: int  # processes per run (per node): more than one run through torchrun
    nnodes: int  # machines per run: more than one, each runs launch.sh with its NODE_RANK; they meet by c10d
    node_rank: int
    rdzv_endpoint: str  # host:port of the rendezvous (on node 0), with NNODES > 1
    rdzv_id: str
    lanes: int  # runs side by side
    train_extra: str  # TRAIN_EXTRA, EVAL_EXTRA: appended to every command
    eval_extra: str
    retrain_base: bool  # the demo: make its base model again (launch.sh --retrain-base)

    @classmethod
    def from_env(cls, env=os.environ, retrain_base: bool = False) -> "Plan":
        """Raises ValueError with the line launch.sh prints for a bad MODEL, NPROC or PARALLEL."""
        runs_dir = Path(env.get("RUNS") or "runs")
        demo = not env.get("MODEL")
        if retrain_base and not demo:
            raise ValueError(f"--retrain-base: the demo's base model is made only without MODEL (MODEL={env['MODEL']})")
        if demo:
            model, depth = str(demo_model(runs_dir, retrain_base)), ChatGLMConfig.from_name(DEMO_PRESET).num_layers
            data_dir = env.get("DATA_DIR") or str(DEMO_DATA)
        else:
            model, depth = env["MODEL"], model_depth(env["MODEL"])
            data_dir = env.get("DATA_DIR") or str(STUDY_DATA if STUDY_DATA.is_dir() else DEMO_DATA)
        nnodes = count(env, "NNODES", 1)
        node_rank, endpoint = env.get("NODE_RANK", ""), env.get("RDZV_ENDPOINT", "")
        lanes = count(env, "PARALLEL", LANES["demo" if demo else "study"] if nnodes == 1 else 1)
        if nnodes > 1:
            if not (node_rank.isdigit() and int(node_rank) < nnodes):
                raise ValueError(f"NNODES={nnodes}: NODE_RANK={node_rank or '(unset)'}: expected this machine's "
                                 f"number, 0-{nnodes - 1}")
            if ":" not in endpoint:
                raise ValueError(f"NNODES={nnodes}: RDZV_ENDPOINT={endpoint or '(unset)'}: expected host:port of "
                                 "node 0, e.g. RDZV_ENDPOINT=node0:29500")
            if lanes > 1:  # the runs side by side would meet at one endpoint, and a node could join the wrong one
                raise ValueError(f"NNODES={nnodes} with PARALLEL={lanes}: a multi-node launch runs one run at a time")
            if retrain_base:
                raise ValueError(f"--retrain-base with NNODES={nnodes}: the demo's base model trains on one machine")
        return cls(demo=demo, model=model, data_dir=data_dir, runs_dir=runs_dir, depth=depth,
                   py=env.get("PY") or "python3", nproc=count(env, "NPROC", 1), nnodes=nnodes,
                   node_rank=int(node_rank) if nnodes > 1 else 0, rdzv_endpoint=endpoint,
                   rdzv_id=env.get("RDZV_ID") or "chatglm", lanes=lanes,
                   train_extra=env.get("TRAIN_EXTRA", ""), eval_extra=env.get("EVAL_EXTRA", ""),
                   retrain_base=retrain_base)

    def run(self, row: Row, seed: int) -> Run:
        layers = layer_range(row.layers, self.depth)
        name = f"{row.id}-{'base' if row.method == 'none' else row.method}"
        name += f"-{row.target}-{layers}" if row.target != "-" else ""
        name += "-aux" if row.aux else ""
        name += f"-seed{seed}" if seed != DEFAULT_SEED else ""
        out = self.runs_dir / name
        data, extra = (f"{TRAIN_SET},{AUX_SET}", f" --max-samples {AUX_MAX_SAMPLES}") if row.aux else (TRAIN_SET, "")
        seeded = f" --seed {seed}" if seed != DEFAULT_SEED else ""
        train = ""
        if row.method != "none":
            train = f"{self.launcher(name + '-train')} train.py --model {self.model} --method {row.method}"
            train += f" --target {row.target} --layers {layers}" if row.target != "-" else ""
            train += f" --dataset {data} --dataset-dir {self.data_dir}{extra}{seeded} --output-dir {out}"
            train = flags(train, DEMO_TRAIN if self.demo else STUDY_TRAIN, self.train_extra)
        evaluate = f"{self.launcher(name + '-eval')} evaluate.py --model {self.model}"
        evaluate += f" --run {out}" if row.method != "none" else ""
        evaluate += (f" --dataset {','.join(EVAL_SETS)} --dataset-dir {self.data_dir} --max-samples {EVAL_SAMPLES}"
                     f" --output-dir {out / EVAL}{seeded}")
        evaluate = flags(evaluate, DEMO_EVAL if self.demo else STUDY_EVAL, self.eval_extra)
        return Run(row, seed, layers, name, out, train, evaluate)

    def launcher(self, job: str) -> str:
        """What starts a script of `job`: Python, torchrun on this machine, or this node's torchrun agent of an
        NNODES-node job. Each job has its own rendezvous id: a node that starts the next job while another still
        ends the last one does not join the closed rendezvous."""
        if self.nnodes > 1:
            return (f"{self.py} -m torch.distributed.run --nnodes {self.nnodes} --nproc_per_node {self.nproc} "
                    f"--node_rank {self.node_rank} --rdzv_backend c10d --rdzv_endpoint {self.rdzv_endpoint} "
                    f"--rdzv_id {self.rdzv_id}-{job}")
        return f"{self.py} -m torch.distributed.run --nproc_per_node {self.nproc}" if self.nproc > 1 else self.py

    def runs(self, ids: list[int], seeds: int) -> list[Run]:
        """The chosen rows (all when `ids` is empty), each once per seed: 42, 43, ... (a row's seeds one after
        the other, so that the lanes run them side by side)."""
        unknown = sorted(set(ids) - {row.id for row in GRID})
        if unknown:
            raise ValueError(f"no run id {unknown[0]} (ids are 0-{len(GRID) - 1})")
        return [self.run(row, DEFAULT_SEED + k) for row in GRID if not ids or row.id in ids for k in range(seeds)]

    def cpu_env(self, env=os.environ) -> dict:
        """The environment the demo's commands run in (DEMO_THREADS, DEMO_X86); none with MODEL."""
        if not self.demo:
            return {}
        pins = DEMO_X86 if has_avx2() else {}
        return {**DEMO_THREADS, **{k: env.get(k) or v for k, v in pins.items()}}

    def comparable(self) -> bool:
        """Whether the runs are the README's demo table's (`python -m study compare`): no MODEL, the bundled data, no
        TRAIN_EXTRA / EVAL_EXTRA."""
        return self.demo and Path(self.data_dir) == DEMO_DATA and not (self.train_extra or self.eval_extra)

    def base_model(self) -> tuple[str, str]:
        """The demo's base model: its training from the tiny preset, and its export as RUNS/DEMO_MODEL."""
        trained = self.runs_dir / DEMO_BASE_RUN
        train = flags(f"{self.py} train.py", DEMO_BASE_TRAIN, f"--dataset-dir {self.data_dir} --output-dir {trained}",
                      self.train_extra)
        return train, (f"{self.py} -m adapters --model {DEMO_PRESET} --adapter {trained} "
                       f"--output {self.runs_dir / DEMO_MODEL}")


def demo_model(runs_dir: Path, retrain: bool = False) -> Path:
    """The demo's base model: RUNS/base-model where --retrain-base made one (or is to make it), else the committed
    one."""
    made = runs_dir / DEMO_MODEL
    return made if retrain or (made / "config.json").is_file() else DEMO_BASE


def flags(command: str, *more: str) -> str:
    """A command with more flags appended, spaces as one."""
    return " ".join(command.split() + [w for m in more for w in m.split()])


def model_depth(model: str) -> int:
    config = Path(model) / "config.json"
    if not Path(model).is_dir():
        raise ValueError(f"MODEL={model}: no such directory (expected a ChatGLM-6B model directory)")
    if not config.is_file():
        raise ValueError(f"MODEL={model}: no config.json in it (expected a ChatGLM-6B model directory)")
    try:
        return ChatGLMConfig.from_json(config).num_layers
    except (ValueError, TypeError):
        raise ValueError(f"{config}: no num_layers (expected a ChatGLM config)") from None


def count(env, name: str, default: int) -> int:
    text = env.get(name) or str(default)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text}: expected a number, at least 1")
    return int(text)


# ---------------------------------------------------------------- the model a script takes without --model

MODEL_HELP = ("model directory (released ChatGLM-6B layout) or a preset ('tiny': random weights). Unset: $MODEL, "
              f"else the demo's base model (runs/{DEMO_MODEL} where `bash launch.sh --retrain-base` made one, else "
              f"{DEMO_BASE})")


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """The model a script runs on: --model, else $MODEL (e.g. the downloaded ChatGLM-6B directory), else the demo's
    base model. -> (it, None when --model was given, else a line saying which was taken)."""
    if model is not None:
        return model, None
    if os.environ.get("MODEL"):
        return os.environ["MODEL"], f"model: $MODEL = {os.environ['MODEL']}"
    repo = Path(__file__).resolve().parents[1]
    path = repo / demo_model(repo / "runs")
    if path.is_relative_to(repo) and Path.cwd().resolve() == repo:
        path = path.relative_to(repo)
    return str(path), f"model: {path}, the demo's base model (no --model, no $MODEL)"
