"""What several test files share: paths, small models and commands, helpers the code itself does not need, and
the `slow` marker.

    pytest -m "not slow" tests    # the everyday loop: everything but the end-to-end tests (about a minute)
    bash tests/run.sh             # everything (CI)

A test is `slow` when it runs a script end to end: launch.sh, torchrun, a pseudo-terminal, torch.compile.
"""
import dataclasses
import socket
from pathlib import Path

import pytest
import torch

from data import encode_records, load_records
from model.config import ChatGLMConfig
from model.generate import generate_ids, sample_seed
from study.metrics import mean_scores, sample_scores

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the study's data, beside the repository where CI has it

# A model small enough for exact checks in milliseconds: 300 ids, the special ones at the end.
SMALL = ChatGLMConfig(vocab_size=300, hidden_size=64, num_layers=3, num_attention_heads=4, inner_hidden_size=160,
                      max_sequence_length=256, mask_token_id=250, gmask_token_id=251, bos_token_id=254,
                      eos_token_id=255, pad_token_id=3, tie_word_embeddings=False)
GMASK, SOP, EOP, PAD = 251, 254, 255, 3

# train.py on the tiny preset and short samples from the start of the demo role-play set: a step takes milliseconds.
TRAIN_SMALL = ["--model", "tiny", "--precision", "fp32", "--max-samples", "64", "--max-source-length", "48",
               "--max-target-length", "48"]


def small_config(**changes) -> ChatGLMConfig:
    return dataclasses.replace(SMALL, **changes)


def free_port() -> int:
    """A TCP port nobody listens on, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def one_thread():
    """One thread: the same numbers in-process and in the subprocess / torchrun runs (OMP_NUM_THREADS=1), and no
    oversubscription when two ranks share the machine. Files use it with `pytestmark`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a script end to end (launch.sh, torchrun, a pseudo-terminal, "
                                       "torch.compile); `pytest -m 'not slow'` leaves it out")
