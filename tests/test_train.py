"""train.py on the tiny model and the bundled demo data: every method learns, DDP and FSDP2 on 2 ranks equal
one process, a SIGKILLed run resumes bit for bit, and the safety nets stop bad runs before or at step 1-2."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from adapters import AdapterSpec, apply_adapter, load_adapter
from conftest import (REPO, TRAIN_SMALL, build_train_samples, free_port, script_env, torchrun_command,
                      torchrun_node_command, train_log)
from data import DEMO_DIR, collate_train
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.loader import load_model, save_model
from model.memory import memory_per_step
from model.tokenizer import DEMO_TOKENIZER, load_tokenizer
from runtime import checkpoint
from study.rundir import CHECKPOINTS

SMALL = [*TRAIN_SMALL, "--logging-steps", "1"]


def run_train(*args):
    train.main([*SMALL, *map(str, args)])


def adapter(out) -> dict:
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def torchrun(nproc: int, *args, timeout=240):
    done = subprocess.run(torchrun_command(nproc, "train.py", *SMALL, *args), cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if "it/s" not in line]
    assert done.returncode == 0, "\n".join(errors[-40:])
    return done


# ---------------------------------------------------------------- the numbers of the study's model

@pytest.mark.parametrize("method, expected", [
    (["--method", "lora", "--target", "qkv", "--layers", "3"], 393216),
    (["--method", "freeze", "--target", "mlp", "--layers", "3"], 402714624),
    (["--method", "ptuning", "--pre-seq-len", "16"], 3670016),
])
def test_dry_run_reports_chatglm_6b_trainable_params(capsys, method, expected):
    train.main(["--model", "chatglm-6b", *method, "--dry-run"])
    assert f"trainable params: {expected} ||" in capsys.readouterr().out


# ---------------------------------------------------------------- every method learns

@pytest.mark.parametrize("method, lr", [
    (["--method", "freeze", "--target", "mlp", "--layers", "3"], 1e-2),
    (["--method", "freeze", "--target", "qkv", "--layers", "3"], 1e-2),
    (["--method", "ptuning"], 0.3),  # a prefix into a random model moves the loss only with large steps
    (["--method", "lora", "--target", "qkv", "--layers", "3"], 1e-2),
    (["--method", "lora", "--target", "mlp", "--layers", "3"], 1e-2),
    (["--method", "full"], 3e-3),
])
def test_every_method_lowers_the_loss(tmp_path, method, lr):
    out = tmp_path / "run"
    run_train(*method, "--lr", lr, "--max-steps", 30, "--batch-size", 8, "--save-steps", 0,
              "--output-dir", out)
    losses = [row["loss"] for row in train_log(out)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)
    results = json.loads((out / "train_results.json").read_text())
    assert results["steps"] == 30 and results["trainable_params"] > 0
    assert results["train_loss"] == pytest.approx(sum(losses) / 30, rel=1e-6)
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["method"] == method[1] and config["world_size"] == 1 and "torch" in config["versions"]


# ---------------------------------------------------------------- distributed == one process

@pytest.mark.slow
@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(tmp_path, dist):
    """2 ranks x batch 2 == 1 process x batch 4 (with 2 accumulated micro-batches: no_sync / no reduce-scatter
    on the first), fp32, LoRA dropout 0: the same adapter after 10 steps. 65 samples = 17 micro-batches of
    4: step 9 is the last one alone, 1 sample, so rank 1 has an empty share and runs its zero-weight pass."""
    common = ["--method", "lora", "--target", "qkv", "--layers", "3", "--lora-dropout", 0, "--lr", 3e-3,
              "--max-steps", 10, "--grad-accum", 2, "--save-steps", 5, "--max-samples", 65]
    run_train(*common, "--batch-size", 4, "--output-dir", tmp_path / "one")
    torchrun(2, *common, "--batch-size", 2, "--dist", dist, "--output-dir", tmp_path / "two")
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max(t.abs().max().item() for k, t in one.items() if "lora_B" in k) > 1e-3  # it did train
    losses_one, losses_two = ([r["loss"] for r in train_log(tmp_path / d)] for d in ("one", "two"))
    assert losses_one == pytest.approx(losses_two, abs=1e-5)
    assert train_log(tmp_path / "two")[8]["epoch"] == 1.0  # step 9 ends the epoch
    if dist == "fsdp":  # resume from the step-5 checkpoint: the sharded optimizer state is scattered back exactly
        shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-10")
        (tmp_path / "two" / "train_results.json").unlink()
        torchrun(2, *common, "--batch-size", 2, "--dist", dist, "--output-dir", tmp_path / "two", "--resume")
        resumed = adapter(tmp_path / "two")
        assert all(torch.equal(two[k], resumed[k]) for k in two)


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path):
    """Two torchrun agents on this machine acting as two nodes (c10d rendezvous, one process each, gloo): global
    ranks 0 and 1, each LOCAL_RANK 0, as on two machines. Batch 2 per node == 1 process x batch 4: the same losses
    and adapter; only global rank 0 prints."""
    common = ["--method", "lora", "--target", "qkv", "--layers", "3", "--lora-dropout", 0, "--lr", 3e-3,
              "--max-steps", 4, "--save-steps", 0, "--max-samples", 16]
    run_train(*common, "--batch-size", 4, "--output-dir", tmp_path / "one")
    endpoint = f"localhost:{free_port()}"
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    agents = []
    try:
        for r, log in enumerate(logs):
            command = torchrun_node_command(2, r, endpoint, "train.py", *SMALL, *common, "--batch-size", 2,
                                            "--output-dir", tmp_path / "two")
            with log.open("w") as f:
                agents.append(subprocess.Popen(command, cwd=REPO, env=script_env(), stdout=f, stderr=subprocess.STDOUT))
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "trainable params" in outputs[0] and "trainable params" not in outputs[1]
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max(t.abs().max().item() for k, t in one.items() if "lora_B" in k) > 1e-3  # it did train
    losses_one, losses_two = ([r["loss"] for r in train_log(tmp_path / d)] for d in ("one", "two"))
    assert len(losses_one) == 4 and losses_one == pytest.approx(losses_two, abs=1e-5)
    assert json.loads((tmp_path / "two" / "train_results.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------- one output matrix (tie_word_embeddings)

def tied_tiny(path) -> Path:
    """The tiny preset with one matrix for the embedding and the output layer, as a checkpoint directory."""
    config = ChatGLMConfig.from_name("tiny")
    config.tie_word_embeddings = True
    model = ChatGLMModel(config).init_weights(0)
    return save_model(model.state_dict(), config, path, tokenizer_file=DEMO_TOKENIZER)


def test_full_fine_tuning_trains_the_one_tied_matrix(tmp_path):
    base = tied_tiny(tmp_path / "base")
    run_train("--model", base, "--method", "full", "--lr", 3e-3, "--max-steps", 3, "--batch-size", 4,
              "--save-steps", 0, "--output-dir", tmp_path / "run")
    trained = adapter(tmp_path / "run")
    assert "lm_head.weight" not in trained and "transformer.word_embeddings.weight" in trained
    before = load_model(base)
    assert (trained["transformer.word_embeddings.weight"] - before.lm_head.weight).abs().max() > 1e-3
    model = load_model(base)
    load_adapter(model, tmp_path / "run")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, trained["transformer.word_embeddings.weight"])
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["trainable_params"] == sum(
        p.numel() for p in before.parameters())  # the tied matrix counted once


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_full_fine_tuning_of_a_tied_model_on_two_ranks_equals_one_process(tmp_path, dist):
    """The tied matrix gets the gradient of both its uses, reduced over ranks like any other (FSDP2: sharded)."""
    base = tied_tiny(tmp_path / "base")
    common = ["--model", base, "--method", "full", "--lr", 3e-3, "--max-steps", 3, "--save-steps", 0,
              "--max-samples", 16]
    run_train(*common, "--batch-size", 4, "--output-dir", tmp_path / "one")
    torchrun(2, *common, "--batch-size", 2, "--dist", dist, "--output-dir", tmp_path / "two")
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and "lm_head.weight" not in one
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    emb = "transformer.word_embeddings.weight"
    assert (one[emb] - load_model(base).transformer.word_embeddings.weight).abs().max() > 1e-3


# ---------------------------------------------------------------- exact resume

def test_resume_passes_over_a_damaged_checkpoint(tmp_path, capsys):
    """A latest checkpoint that no longer reads (here its optimizer state cut to 100 bytes) is named, and the run
    resumes from the one before it, ending where the uninterrupted run ends; with none readable, one line."""
    flags = ["--method", "lora", "--max-steps", 6, "--batch-size", 2, "--save-steps", 2]
    run_train(*flags, "--output-dir", tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "run")
    (tmp_path / "run" / "train_results.json").unlink()  # as if killed after its last checkpoint
    damaged = tmp_path / "run" / CHECKPOINTS / "step-6" / checkpoint.OPTIMIZER
    with open(damaged, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    run_train(*flags, "--output-dir", tmp_path / "run", "--resume")
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run' / CHECKPOINTS}: cannot read step-6 (optimizer.pt: " in out
    assert "); resuming from step-4" in out
    assert "resuming at step 4 from" in out
    whole, resumed = adapter(tmp_path / "whole"), adapter(tmp_path / "run")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    (tmp_path / "run" / "train_results.json").unlink()
    for step in (4, 6):
        (tmp_path / "run" / CHECKPOINTS / f"step-{step}" / checkpoint.STATE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"no checkpoint can be read \(step-6 \(trainer_state.pt: .*step-4 .*--overwrite"):
        run_train(*flags, "--output-dir", tmp_path / "run", "--resume")


class Payload:
    """A pickle that runs code when unpickled: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_runs_no_code_from_a_planted_pickle(tmp_path, capsys):
    """A run directory from someone else: its latest trainer_state.pt is a pickle that would create a file when
    loaded. --resume reads every checkpoint file with weights_only=True, passes over that one, and runs nothing."""
    flags = ["--method", "lora", "--max-steps", 4, "--batch-size", 2, "--save-steps", 2, "--output-dir", tmp_path / "run"]
    run_train(*flags)
    (tmp_path / "run" / "train_results.json").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"step": 4, "trap": Payload(marker)}, tmp_path / "run" / CHECKPOINTS / "step-4" / checkpoint.STATE)
    capsys.readouterr()
    run_train(*flags, "--resume")
    out = capsys.readouterr().out
    assert "cannot read step-4 (trainer_state.pt: " in out and "resuming from step-2" in out
    assert not marker.exists()


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Dropout on (LoRA 0.1): the resumed run must restore the RNG, the optimizer, the schedule and the
    data position to end with the uninterrupted run's adapter, bit for bit."""
    common = ["--method", "lora", "--target", "qkv", "--layers", "3", "--lr", 3e-3, "--max-steps", 40,
              "--batch-size", 4, "--save-steps", 5]
    run_train(*common, "--output-dir", tmp_path / "full")

    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *SMALL, *map(str, common), "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while checkpoint.latest(out / CHECKPOINTS) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint.latest(out / CHECKPOINTS).name.split("-")[1])
    assert killed_at < 40 and not (out / "train_results.json").exists(), "the run finished before the kill"

    run_train(*common, "--output-dir", out, "--resume")
    full, resumed = adapter(tmp_path / "full"), adapter(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [r["step"] for r in train_log(out)] == list(range(1, 41))  # the log continues where the checkpoint was
    uninterrupted = train_log(tmp_path / "full")
    assert train_log(out) == [{**r, "tokens_per_s": s["tokens_per_s"]} for r, s in zip(uninterrupted, train_log(out))]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-35", "step-40"]  # the last two


def test_grad_checkpointing_changes_nothing(tmp_path):
    common = ["--method", "lora", "--target", "mlp", "--layers", "2", "--lr", 1e-2, "--max-steps", 4,
              "--batch-size", 4, "--save-steps", 0]
    run_train(*common, "--output-dir", tmp_path / "plain")
    run_train(*common, "--grad-checkpointing", "--output-dir", tmp_path / "ckpt")
    plain, ckpt = adapter(tmp_path / "plain"), adapter(tmp_path / "ckpt")
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)  # dropout masks replayed in the recomputation


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path):
    def good(d):
        d.mkdir(parents=True)
        (d / "adapter.json").write_text("{}")

    def dies(d):
        good(d)
        raise KeyboardInterrupt  # a kill in the middle of writing step-2

    checkpoint.write(tmp_path, 1, good, {}, {"step": 1})
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write(tmp_path, 2, dies, {}, {"step": 2})
    assert checkpoint.latest(tmp_path) == tmp_path / "step-1"
    assert torch.load(tmp_path / "step-1" / checkpoint.STATE)["step"] == 1


# ---------------------------------------------------------------- safety nets

def test_a_lora_b_without_gradient_stops_the_run(tmp_path, monkeypatch):
    """A hook zeroes one LoRA B's gradient: B stays 0, so its A never gets a gradient either."""
    def apply_and_break(model, spec):
        apply_adapter(model, spec)
        model.transformer.layers[4].attention.query_key_value.lora_B.weight.register_hook(torch.zeros_like)
        return model
    monkeypatch.setattr(train, "apply_adapter", apply_and_break)
    with pytest.raises(train.UntrainedError, match="2 trainable tensor") as err:
        run_train("--method", "lora", "--layers", "3", "--lr", 1e-2, "--max-steps", 5, "--batch-size", 2,
                  "--output-dir", tmp_path / "run")
    assert "layers.4.attention.query_key_value.lora_A.weight" in str(err.value)
    assert "layers.4.attention.query_key_value.lora_B.weight" in str(err.value)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_lora_a_gets_its_gradient_only_at_step_2(tmp_path):
    """Why the check waits for step 2: a healthy LoRA has zero A gradients at step 1 (B = 0) and trains."""
    run_train("--method", "lora", "--layers", "1", "--lr", 1e-2, "--max-steps", 2, "--batch-size", 2,
              "--save-steps", 0, "--output-dir", tmp_path / "run")
    assert (tmp_path / "run" / "train_results.json").is_file()


def test_nan_loss_names_step_and_lr(tmp_path, monkeypatch):
    real = train.token_loss_sum
    calls = []

    def nan_at_step_3(model, batch, device):
        calls.append(1)
        loss = real(model, batch, device)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train, "token_loss_sum", nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(lr 0\.00"):
        run_train("--method", "lora", "--lr", 1e-3, "--max-steps", 5, "--batch-size", 2,
                  "--output-dir", tmp_path / "run")


def test_out_of_memory_names_the_knobs(tmp_path, monkeypatch):
    def oom(model, batch, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "token_loss_sum", oom)
    with pytest.raises(MemoryError, match="--batch-size.*--grad-accum.*--grad-checkpointing.*--max-source-length"):
        run_train("--method", "lora", "--max-steps", 2, "--batch-size", 2, "--output-dir", tmp_path / "run")


def test_bad_requests_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="the model has 6 layers"):
        run_train("--method", "lora", "--layers", "4-7", "--output-dir", tmp_path / "a")
    with pytest.raises(ValueError, match="no_such_set"):
        run_train("--dataset", "no_such_set", "--output-dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    run = ["--method", "lora", "--max-steps", 1, "--batch-size", 2, "--output-dir", tmp_path / "c"]
    run_train(*run)
    with pytest.raises(ValueError, match="already holds this run; pass --resume"):
        run_train(*run)
    with pytest.raises(ValueError, match=r"different training run \(differs in: lr\)"):
        run_train(*run, "--lr", 1e-3)
    run_train(*run, "--lr", 1e-3, "--overwrite", "--plot-loss")
    assert json.loads((tmp_path / "c" / "run_config.json").read_text())["args"]["lr"] == 1e-3
    assert (tmp_path / "c" / "training_loss.png").stat().st_size > 1000


# ---------------------------------------------------------------- no backward below the lowest trainable layer

def test_frozen_lower_layers_record_no_graph():
    """LoRA in layers 3-5 of 6: the hidden states entering layers 0-3 do not require grad, so autograd
    records nothing below layer 3 and backward does no work there (no flag needed: it follows from
    requires_grad). P-Tuning's prefix reaches every layer, so there the graph starts at layer 0."""
    for method, lowest in (("lora", 3), ("ptuning", 0)):
        model = load_model("tiny")
        apply_adapter(model, AdapterSpec(method=method, layers=[3, 4, 5]))
        model.train()
        assert train.lowest_trainable_layer(model) == lowest
        needs_grad = []
        for block in model.transformer.layers:
            block.register_forward_pre_hook(lambda m, args: needs_grad.append(args[0].requires_grad))
        tok = load_tokenizer("tiny")
        samples, _ = build_train_samples(tok, ["roleplay_all_train"], DEMO_DIR, max_samples=2,
                                         max_source_length=32, max_target_length=32)
        loss = train.token_loss_sum(model, collate_train(samples, tok.pad_id), torch.device("cpu"))
        assert needs_grad == [False] * 4 + [True] * 2 if method == "lora" else needs_grad == [False] + [True] * 5
        grad_fns, todo = set(), [loss.grad_fn]
        while todo:  # every node of the backward graph
            fn = todo.pop()
            if fn is not None and fn not in grad_fns:
                grad_fns.add(fn)
                todo.extend(f for f, _ in fn.next_functions)
        embedding_backward = [fn for fn in grad_fns if "Embedding" in type(fn).__name__]
        assert embedding_backward == []  # the word embeddings are never reached


def test_dry_run_memory_per_process_from_the_tensors(monkeypatch, capsys):
    """The estimate against the tiny model's own tensors: LoRA on the last layer, FSDP2 over 4 processes, bf16."""
    lora = ["--method", "lora", "--target", "qkv", "--layers", "5-5", "--lora-rank", "8"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    train.main(["--model", "tiny", *lora, "--dist", "fsdp", "--precision", "bf16", "--batch-size", "2",
                "--max-source-length", "30", "--max-target-length", "10", "--dry-run"])
    printed = capsys.readouterr().out
    model = load_model("tiny")
    apply_adapter(model, AdapterSpec(method="lora", target="qkv", layers=[5], lora_rank=8))
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sorted(trained) == ["transformer.layers.5.attention.query_key_value.lora_A.weight",
                               "transformer.layers.5.attention.query_key_value.lora_B.weight"]
    n = sum(trained.values())
    assert n == 8 * 128 + 384 * 8
    spec = train.parse_args(["--model", "tiny", *lora, "--dist", "fsdp", "--precision", "bf16"])
    memory = memory_per_step(meta_model(spec), torch.bfloat16, 4, False, 5, 2, 30, 10)
    block = sum(p.numel() for p in model.transformer.layers[5].parameters())  # the largest: it holds the LoRA
    root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.transformer.layers.parameters())
    assert memory["parameters"] == (4 * n + 2 * frozen) // 4 + 2 * (root + 2 * block)
    assert memory["gradients"] == 4 * n // 4 and memory["optimizer"] == 8 * n // 4
    # one block backward runs through (layer 5), 80 tokens: 8 x 128 + 2 x 512 values each, bf16; the loss: 20 label
    # tokens x 128 in bf16 and a chunk of 2**24 logits in float32 and bf16
    assert memory["activations"] == 80 * (8 * 128 + 2 * 512) * 2 + 20 * 128 * 2 + 2**24 * 6
    assert "memory per process, 4 x --dist fsdp (sharded), batch 2 x 40 tokens, bf16" in printed
    assert f"optimizer {8 * n / 4 / 2**30:.2f} GiB" in printed


def meta_model(s: train.Settings) -> ChatGLMModel:
    """A run's model as build_model leaves it, on the meta device."""
    with torch.device("meta"):
        model = ChatGLMModel(ChatGLMConfig.from_name("tiny"))
    apply_adapter(model, s.adapter)
    return train.float32_trainable(model.to(torch.bfloat16))
