"""What several test files share: paths, small models and commands, helpers the code itself does not need, and
the `slow` marker.

    pytest -m "not slow" tests    # the everyday loop: everything but the end-to-end tests (about a minute)
    bash tests/run.sh             # everything (CI)

A test is `slow` when it runs a script end to end: launch.sh, torchrun, a pseudo-terminal, torch.compile, or
train.py / evaluate.py as a subprocess for seconds.
"""
import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DEMO_DIR, build_eval_samples, encode_records, load_records
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.generate import generate_ids, sample_seed
from runtime.files import write_json
from study.fingerprint import code_fingerprint
from study.metrics import METRICS, mean_scores, sample_scores, score_stats
from study.rundir import LOG

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the study's data, beside the repository where CI has it

# A model small enough for exact checks in milliseconds: 300 ids, the special ones at the end. Untied, like the
# tiny preset: a random tied model decodes greedily to one repeated token (model.chatglm.PRESETS).
SMALL = ChatGLMConfig(vocab_size=300, hidden_size=64, num_layers=3, num_attention_heads=4, inner_hidden_size=160,
                      max_sequence_length=256, mask_token_id=250, gmask_token_id=251, bos_token_id=254,
                      eos_token_id=255, pad_token_id=3, tie_word_embeddings=False)
GMASK, SOP, EOP, PAD = 251, 254, 255, 3

# train.py on the tiny preset and short samples from the start of the demo role-play set: a step takes milliseconds.
TRAIN_SMALL = ["--model", "tiny", "--precision", "fp32", "--max-samples", "64", "--max-source-length", "48",
               "--max-target-length", "48"]


def small_config(**changes) -> ChatGLMConfig:
    return dataclasses.replace(SMALL, **changes)


def small_model(config: ChatGLMConfig = SMALL, seed: int = 0, std: float = 0.3) -> ChatGLMModel:
    """Random weights of `config`, in eval mode. The model gets a copy of the config: an adapter writes its
    settings into the model's, and the shared one must stay as it is."""
    return ChatGLMModel(dataclasses.replace(config)).init_weights(seed, std=std).eval()


def rotary_buffers(config: ChatGLMConfig) -> dict[str, torch.Tensor]:
    """The rotary inv_freq buffers the released checkpoint also stores (float16; the loader must ignore them)."""
    d = config.head_dim // 2
    return {f"transformer.layers.{i}.attention.rotary_emb.inv_freq": torch.ones(d // 2).half()
            for i in range(config.num_layers)}


def write_bin_shards(sd: dict, config: ChatGLMConfig, path: Path, n_shards: int = 3) -> Path:
    """`sd` in the release's layout: pytorch_model-0000k-of-0000n.bin shards (every n-th key), their index and
    config.json."""
    path.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for s in range(n_shards):
        name = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in keys[s::n_shards]}
        torch.save(part, path / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    write_json(path / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(path / "config.json", config.to_dict())
    return path


def free_port() -> int:
    """A TCP port nobody listens on, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env() -> dict[str, str]:
    """The environment of train.py / evaluate.py run as a subprocess: this checkout importable, and one thread like
    the in-process runs (one_thread), for the same numbers."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun_command(nproc: int, script: str, *args) -> list[str]:
    """The command that runs `script` with `args` on `nproc` local processes (torch.distributed.run, a free port);
    run it with cwd=REPO and script_env()."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), script, *map(str, args)]


def torchrun_node_command(nnodes: int, node_rank: int, endpoint: str, script: str, *args) -> list[str]:
    """One node's torchrun agent of an `nnodes`-node job, one process on it, that meets the others at `endpoint`
    (host:port) by c10d rendezvous; start one per node rank with the same endpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", "1",
            "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id",
            f"nodes-{endpoint}", script, *map(str, args)]


def train_log(out) -> list[dict]:
    """The lines of a run's trainer_log.jsonl; unlike runtime.files.read_jsonl, a broken line fails the test."""
    return [json.loads(line) for line in (Path(out) / LOG).read_text().splitlines()]


def build_train_samples(tokenizer, names: list[str], dataset_dir, max_samples: int | None = None, seed: int = 42,
                        max_source_length: int = 512, max_target_length: int = 512, source_prefix: str = "",
                        expand_history: bool = False, skip_bad_records: bool = False) -> tuple[list[dict], dict]:
    """The named datasets' records (data.load_records), encoded for training (data.encode_records), as train.py
    does -> ([{"input_ids", "labels"}], report)."""
    records, report = load_records(names, dataset_dir, max_samples, seed, skip_bad_records)
    samples, counts = encode_records(tokenizer, records, max_source_length, max_target_length, source_prefix,
                                     expand_history)
    report.update(counts)
    return samples, report


def greedy_answers(model, tokenizer, dataset: str, n: int, max_length: int, max_source_length: int) -> list[str]:
    """What `evaluate.py --greedy` must predict for the first n samples of a demo set: each sample generated
    alone, up to its own cap (max_length - prompt), decoded by the study's rule."""
    answers = []
    for s in build_eval_samples(tokenizer, dataset, DEMO_DIR, n, max_source_length=max_source_length):
        row = generate_ids(model, [s["input_ids"]], max_new_tokens=max_length - len(s["input_ids"]))[0]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def corpus_scores(predicts: list[str], labels: list[str]) -> dict[str, float]:
    """The reported value of each metric for these predictions: the mean of the per-sample scores."""
    return mean_scores([sample_scores(p, l) for p, l in zip(predicts, labels, strict=True)])


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, max_length: int | None = None,
             do_sample: bool = False, top_p: float = 0.7, temperature: float = 0.95, seed: int = 0) -> list[str]:
    """Prompt strings -> answers decoded by the study's rule, as evaluate.py generates them."""
    ids = [tokenizer.encode(p) for p in prompts]
    seeds = [sample_seed(seed, i) for i in range(len(prompts))]
    rows = generate_ids(model, ids, max_new_tokens, max_length, do_sample, top_p, temperature, seeds)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def write_scored_run(runs: Path, dirname: str, run: dict, rows_by_set: dict):
    """A run directory as evaluate.py leaves it: per set scores.jsonl and a metrics.json made from those rows."""
    d = runs / dirname
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": dirname, **run}))
    for name, rows in rows_by_set.items():
        (d / "eval" / name).mkdir(parents=True)
        (d / "eval" / name / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {**score_stats(rows), "fingerprint": {"code": code_fingerprint()}}
        (d / "eval" / name / "metrics.json").write_text(json.dumps(metrics))


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Per-sample scores shaped like the study's: metrics in [0, 100] with a long tail, NLL, reference tokens."""
    rng = np.random.default_rng(seed)
    return [{"index": i, **{k: float(v) for k, v in zip(METRICS, rng.gamma(2.0, 8.0, 4).clip(0, 100).round(4))},
             "nll": float(rng.uniform(1.5, 3.0)), "target_tokens": int(rng.integers(5, 60))} for i in range(n)]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test on one thread, whatever OMP_NUM_THREADS says: the same numbers in-process and in the subprocess /
    torchrun runs (script_env), no oversubscription when two ranks share the machine, and no threads waiting on
    each other over models this small (with 2 threads on a busy 2-core machine, `-m "not slow"` took 4x as long)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    # A shell that starts a command in the background (`cmd &`, nohup) starts it with SIGINT ignored, and every
    # process it starts inherits that: the Ctrl-C tests' scripts would not see their SIGINT. Python's own handler
    # here is reset to the default in each child.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "slow: runs a script end to end (launch.sh, torchrun, a pseudo-terminal, "
                                       "torch.compile, train.py / evaluate.py as a subprocess for seconds); "
                                       "`pytest -m 'not slow'` leaves it out")
