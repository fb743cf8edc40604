"""Validation during training: the loss logged every --eval-steps is the model's loss on the held-out samples at
that step, the best step is the log's minimum and survives a resume, the held-out records are chosen by the seed
and never trained on, the training is the same with validation as without, and 2 ranks validate like 1 process."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from adapters import load_adapter
from conftest import REPO, TRAIN_SMALL, script_env, torchrun_command, train_log
from data import DEMO_DIR, DataError, build_prompt, encode_train, hold_out, load_records
from model.loader import load_model
from model.loss import IGNORE
from model.tokenizer import load_tokenizer
from study import training
from study.rundir import LOG


SMALL = [*TRAIN_SMALL, "--logging-steps", "1", "--method", "lora", "--batch-size", "4"]


def run_train(*args):
    train.main([*SMALL, *map(str, args)])


def val_rows(out) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in train_log(out) if "val_loss" in r]


def train_rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in train_log(out) if "loss" in r]


def results(out) -> dict:
    return json.loads((Path(out) / "train_results.json").read_text())


def held_out_samples(n: int, seed: int = 42) -> list[dict]:
    """What --val-size n holds out of SMALL's records, encoded here without train.py."""
    tok = load_tokenizer("tiny")
    records, _ = load_records(["roleplay_all_train"], DEMO_DIR, max_samples=64, seed=seed)
    encoded = [encode_train(tok, build_prompt(r["prompt"], r["history"]), r["response"], 48, 48) for r in records[:n]]
    return [{"input_ids": ids, "labels": labels} for ids, labels, _ in encoded]


def loss_from_logits(adapter_dir: Path, samples: list[dict]) -> float:
    """Mean token cross-entropy from the full logits of the model with the adapter, one sample at a time."""
    model = load_model("tiny")
    load_adapter(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s["input_ids"]]))[0]  # (T, V)
            labels = torch.tensor(s["labels"][1:])  # position t predicts label t + 1
            total += F.cross_entropy(logits[:-1].double(), labels, ignore_index=IGNORE, reduction="sum").item()
            count += (labels != IGNORE).sum().item()
    return total / count


# ---------------------------------------------------------------- the logged loss, the best step

def test_the_logged_validation_loss_is_the_models_loss_at_that_step(tmp_path):
    """LoRA dropout 0.1 is on in training: a validation in train mode would not match the logits' loss."""
    out = tmp_path / "run"
    run_train("--lr", 1e-2, "--max-steps", 7, "--val-size", 6, "--eval-steps", 3, "--save-steps", 3,
              "--output-dir", out, "--plot-loss")
    rows = val_rows(out)
    assert [step for step, _ in rows] == [3, 6, 7]  # every --eval-steps and after the last step
    assert len({loss for _, loss in rows}) == 3  # the adapter moved between them
    samples = held_out_samples(6)
    assert rows[1][1] == pytest.approx(loss_from_logits(out / "checkpoints" / "step-6", samples), abs=1e-5)
    assert rows[2][1] == pytest.approx(loss_from_logits(out, samples), abs=1e-5)
    best_step, best_loss = min(rows, key=lambda r: r[1])
    res = results(out)
    assert res["best_val_step"] == best_step and res["best_val_loss"] == pytest.approx(best_loss, abs=1e-6)
    assert res["val_loss"] == pytest.approx(rows[-1][1], abs=1e-6)
    assert [r["step"] for r in train_rows(out)] == list(range(1, 8))  # training lines as before
    assert (out / "training_loss.png").stat().st_size > 1000


def test_resume_keeps_the_best_so_far(tmp_path, monkeypatch):
    """The best (step 4) lies before the checkpoint the run resumes from (step 6): only the checkpoint knows it."""
    losses = [3.0, 1.0, 2.0, 2.5, 2.5]  # steps 2, 4, 6, 8; then step 8 again after the resume
    monkeypatch.setattr(train, "validate", lambda s, batches: losses.pop(0))
    out = tmp_path / "run"
    common = ["--max-steps", 8, "--val-size", 4, "--eval-steps", 2, "--save-steps", 2, "--output-dir", out]
    run_train(*common)
    assert results(out)["best_val_step"] == 4
    shutil.rmtree(out / "checkpoints" / "step-8")
    (out / "train_results.json").unlink()
    run_train(*common, "--eval-steps", 4, "--resume")  # --eval-steps changes nothing trained: the same run
    assert losses == [] and val_rows(out) == [(2, 3.0), (4, 1.0), (6, 2.0), (8, 2.5)]
    res = results(out)
    assert (res["best_val_step"], res["best_val_loss"], res["val_loss"]) == (4, 1.0, 2.5)


def test_a_different_val_size_is_a_different_run(tmp_path):
    run_train("--max-steps", 1, "--val-size", 4, "--output-dir", tmp_path / "run")
    with pytest.raises(ValueError, match=r"differs in: val_size"):
        run_train("--max-steps", 1, "--val-size", 5, "--output-dir", tmp_path / "run", "--resume")


# ---------------------------------------------------------------- the held-out records

def test_held_out_records_are_chosen_by_the_seed():
    records, _ = load_records(["roleplay_all_train"], DEMO_DIR, max_samples=64, seed=1)
    rest, held = hold_out(records, 10)
    assert len(held) == 10 and len(rest) == 54
    assert {r["source"] for r in held}.isdisjoint(r["source"] for r in rest)
    assert {r["source"] for r in held} | {r["source"] for r in rest} == {("roleplay_all_train", i) for i in range(64)}
    assert held == hold_out(load_records(["roleplay_all_train"], DEMO_DIR, max_samples=64, seed=1)[0], 10)[1]
    other = hold_out(load_records(["roleplay_all_train"], DEMO_DIR, max_samples=64, seed=2)[0], 10)[1]
    assert {r["source"] for r in other} != {r["source"] for r in held}
    assert hold_out(records, 0) == (records, [])
    with pytest.raises(DataError, match="--val-size 64 holds out all of the 64 training records"):
        hold_out(records, 64)
    with pytest.raises(DataError, match="--val-size 65 holds out more than all .*at most 63"):
        hold_out(records, 65)


def load_samples(*flags):
    s = train.parse_args([*SMALL, *flags])
    return train.load_samples(s.data, s.val, s.optim, load_tokenizer("tiny"), 1)


def test_the_training_samples_lack_the_held_out_ones():
    data, val, report = load_samples("--val-size", "10")
    assert len(data.samples) == 54 and report["held_out"] == 10
    assert val == held_out_samples(10)
    assert {tuple(s["input_ids"]) for s in data.samples}.isdisjoint(tuple(s["input_ids"]) for s in val)
    data, val, _ = load_samples("--eval-dataset", "roleplay_all_test")
    assert len(data.samples) == 64 and len(val) == 64  # the test set's first --max-samples records
    with pytest.raises(ValueError, match="--val-size 100 holds out more than all of the 64"):
        load_samples("--val-size", "100")


@pytest.mark.parametrize("flag, bad", [("--val-size", "-1"), ("--eval-steps", "0"), ("--val-size", "ten")])
def test_validation_flags_are_checked_when_parsed(capsys, flag, bad):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "tiny", flag, bad])
    assert f"argument {flag}" in capsys.readouterr().err


# ---------------------------------------------------------------- the training is the same

def test_validation_changes_nothing_in_training(tmp_path):
    """Dropout on (LoRA 0.1): a validation that drew a random number would shift every later mask."""
    common = ["--lr", 1e-2, "--max-steps", 6, "--save-steps", 0]
    run_train(*common, "--output-dir", tmp_path / "plain")
    run_train(*common, "--val-size", 0, "--eval-dataset", "roleplay_all_test", "--eval-steps", 2,
              "--output-dir", tmp_path / "val")
    assert [s for s, _ in val_rows(tmp_path / "val")] == [2, 4, 6] and val_rows(tmp_path / "plain") == []
    assert train_rows(tmp_path / "plain") == train_rows(tmp_path / "val")
    plain, val = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "val"))
    assert all(torch.equal(plain[k], val[k]) for k in plain)


# ---------------------------------------------------------------- 2 ranks == 1 process


@pytest.mark.slow
def test_two_fsdp_ranks_validate_like_one_process(tmp_path):
    """9 held-out samples in global batches of 4: rank 1's share of the last one is empty (an uncounted pass, as
    FSDP2 gathers weights in every forward). Full fine-tuning: the root's trainable embeddings and output layer
    must be sharded again for the checkpoint right after each validation (a forward without backward leaves
    them gathered)."""
    common = ["--method", "full", "--lr", 3e-3, "--max-steps", 4, "--val-size", 9, "--eval-steps", 2,
              "--save-steps", 2]
    run_train(*common, "--output-dir", tmp_path / "one")
    cmd = torchrun_command(2, "train.py", *SMALL, *common, "--batch-size", 2, "--dist", "fsdp", "--output-dir",
                           tmp_path / "two")
    done = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = val_rows(tmp_path / "one"), val_rows(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4]
    assert [v for _, v in one] == pytest.approx([v for _, v in two], abs=1e-5)
    assert one[1][1] == pytest.approx(loss_from_logits(tmp_path / "two", held_out_samples(9)), abs=1e-5)


# ---------------------------------------------------------------- the plot

def test_the_plot_shows_the_validation_points(tmp_path):
    train_lines = [{"step": k, "loss": 3 - k / 10} for k in range(1, 11)]
    for name, rows in (("train", train_lines), ("both", train_lines + [{"step": 5, "val_loss": 2.9},
                                                                       {"step": 10, "val_loss": 2.7}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
        training.plot_loss(tmp_path / name / LOG, tmp_path / name / "training_loss.png")
    png = {name: (tmp_path / name / "training_loss.png").read_bytes() for name in ("train", "both")}
    assert len(png["both"]) > 1000 and png["both"] != png["train"]


# ---------------------------------------------------------------- TensorBoard (optional: pip install tensorboard)

def test_tensorboard_shows_the_logs_numbers_and_changes_nothing_else(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = tmp_path / "runs"
    for name, flag in (("plain", []), ("board", ["--tensorboard"])):
        run_train("--lr", 1e-2, "--max-steps", 6, "--logging-steps", 2, "--val-size", 6, "--eval-steps", 3,
                  "--output-dir", runs / name, *flag)
    # what `tensorboard --logdir runs` reads: one run per directory that has event files, named by it
    board = EventMultiplexer().AddRunsFromDirectory(str(runs))
    board.Reload()
    assert list(board.Runs()) == ["board"]
    assert set(board.Runs()["board"]["scalars"]) == {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"}
    log = train_log(runs / "board")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        events = board.Scalars("board", key)
        assert [e.step for e in events] == [r["step"] for r in log if key in r]
        assert [e.value for e in events] == pytest.approx([r[key] for r in log if key in r], rel=1e-6)
    assert [e.step for e in board.Scalars("board", "val_loss")] == [3, 6]
    # the flag changes no number: the same adapter, the same settings fingerprint, the same log but the speed
    assert results(runs / "board")["fingerprint"] == results(runs / "plain")["fingerprint"]
    assert (runs / "board" / "adapter_model.safetensors").read_bytes() == \
        (runs / "plain" / "adapter_model.safetensors").read_bytes()
    assert train_rows(runs / "board") == train_rows(runs / "plain")


def test_a_resumed_board_hides_what_the_interrupted_attempt_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = training.open_board(tmp_path, 0)
    for step in range(1, 7):  # interrupted after step 6; its last checkpoint is step 3's
        first.add_scalar("loss", 10.0 - step, step)
    first.close()
    again = training.open_board(tmp_path, 3)
    for step in (4, 5):
        again.add_scalar("loss", 100.0 + step, step)
    again.close()
    shown = EventAccumulator(str(tmp_path))
    shown.Reload()
    assert [(e.step, e.value) for e in shown.Scalars("loss")] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0),
                                                                    (5, 105.0)]


def test_tensorboard_without_its_package_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as where it is not installed
    with pytest.raises(ValueError, match=r"^--tensorboard needs the tensorboard package: pip install tensorboard$"):
        train.parse_args([*SMALL, "--tensorboard"])
    assert train.parse_args(SMALL).out.tensorboard is False  # without the flag nothing asks for it
