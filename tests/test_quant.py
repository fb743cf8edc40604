"""Quantized frozen weights (model/quant.py): exact packing, logits near float32, real int8/uint8 storage, LoRA
trained over an int8 base and applied to the float base, P-Tuning and Freeze over quantized bases, DDP == one
process, the refusals, and the dry run's base-weights line for ChatGLM-6B."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import evaluate
import train
from adapters import AdapterSpec, LoRALinear, apply_adapter, load_adapter
from conftest import DEMO_DIR, REPO, TRAIN_SMALL, greedy_answers, script_env, torchrun_command, train_log
from data.encode import build_eval_samples
from model.generate import generate_ids
from model.loader import load_model
from model.config import ChatGLMConfig
from model.quant import QuantLinear, base_weight_bytes, quantize_model, tensor_bytes
from model.tokenizer import load_tokenizer
from study.grid import DEMO_BASE

SMALL = [*TRAIN_SMALL, "--logging-steps", "1", "--save-steps", "0"]
LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def quantized_tiny(mode: str):
    model = load_model("tiny").requires_grad_(False)
    assert len(quantize_model(model, mode)) == 6 * 4  # every Linear of the 6 blocks
    return model


# ---------------------------------------------------------------- the format

@pytest.mark.parametrize("mode, qmax, width, group", [("int8", 127, 200, 128), ("int4", 7, 256, 128),
                                                       ("int4", 7, 200, 128), ("int4", 7, 200, 6)])
def test_weights_on_the_grid_come_back_exactly(mode, qmax, width, group):
    """Weights that are integers times 0.25 with a +-qmax in every row (int4: every group) quantize without
    error: dequantize() gives them back bit for bit, whatever the nibble order, and a group size that does not
    divide the width (200 = 128 + 72, 200 = 33 x 6 + 2) pads its last group. The fused form (compiled decoding)
    computes the same product, on inputs of any leading shape."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-qmax, qmax + 1, (48, width), generator=g)
    step = width if mode == "int8" else group
    q[:, ::step] = qmax * torch.where(torch.rand(48, 1, generator=g) < 0.5, -1, 1)  # the absmax of each group
    w, b = q.float() * 0.25, torch.randn(48, generator=g)
    layer = QuantLinear(w, b, mode, group)
    assert torch.equal(layer.dequantize(), w)
    x = torch.randn(5, width, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    fused = layer.fused(x[:, None]) + b  # summed in another order: up to 200 terms of up to |32|, 1e-4 apart
    torch.testing.assert_close(fused, F.linear(x[:, None], w, b), rtol=1e-5, atol=3e-4)
    groups = -(-width // group)
    if mode == "int8":
        assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (48, width)
        assert layer.scales.shape == (48,)
    else:
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (48, groups * group // 2)
        assert layer.scales.shape == (48, groups)


def test_int4_group_size_must_be_even():
    with pytest.raises(ValueError, match="group size must be even"):
        QuantLinear(torch.randn(4, 10), None, "int4", group_size=5)


@pytest.mark.parametrize("mode, ratio", [("int8", 3.8), ("int4", 7.4)])
def test_quantized_layers_store_int8_or_packed_uint8(mode, ratio):
    """The quantized layers' storage (measured on the tensors' storages) is ~4x / ~8x smaller than float32
    (the float32 scales cost 4 bytes per row / per 128 weights), and no float weight of a block is left."""
    model = load_model("tiny")
    float_bytes = sum(m.weight.untyped_storage().nbytes() for m in model.transformer.layers.modules()
                      if isinstance(m, nn.Linear))
    before = tensor_bytes(model)
    model = quantized_tiny(mode)
    quant = [m for m in model.transformer.layers.modules() if isinstance(m, QuantLinear)]
    assert {m.qweight.dtype for m in quant} == {torch.int8 if mode == "int8" else torch.uint8}
    stored = sum(m.qweight.untyped_storage().nbytes() + m.scales.untyped_storage().nbytes() for m in quant)
    assert float_bytes / stored > ratio, (float_bytes, stored)
    assert before - tensor_bytes(model) == float_bytes - stored  # what the model holds dropped by as much
    assert not any(isinstance(m, nn.Linear) for m in model.transformer.layers.modules())
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32  # not quantized


# ---------------------------------------------------------------- numbers near float32

@pytest.mark.parametrize("mode, rel, of_blocks, greedy_same", [("int8", 1e-3, 0.03, 1.0), ("int4", 1e-2, 0.3, 0.6)])
def test_logits_and_greedy_tokens_near_float32(mode, rel, of_blocks, greedy_same):
    """Tolerances: the logits' relative error (Frobenius) below `rel` and below `of_blocks` of what the blocks'
    Linears contribute at all (the tiny model's residual carries most of the logits: the logits with those
    weights zeroed are only ~1.7% away). Measured on this seed: int8 1.7e-4 (1.0% of the blocks' part), int4
    2.9e-3 (17%). Greedy continuations of 8 prompts x 16 tokens: int8 all equal; int4 72% measured (random
    weights give near-ties, so one flipped token changes the rest of its row)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 4096, (4, 40), generator=g)
    prompts = [row + [5, 8] for row in torch.randint(10, 4096, (8, 20), generator=g).tolist()]  # ... [gMASK] <sop>
    reference, quantized, zeroed = load_model("tiny"), quantized_tiny(mode), load_model("tiny")
    with torch.no_grad():
        for m in zeroed.transformer.layers.modules():
            if isinstance(m, nn.Linear):
                m.weight.zero_()
        want, got, without = reference(ids), quantized(ids), zeroed(ids)
    error = (got - want).norm()
    assert error / want.norm() < rel
    assert error / (without - want).norm() < of_blocks
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    a, b = generate_ids(reference, prompts, max_new_tokens=16), generate_ids(quantized, prompts, max_new_tokens=16)
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
    assert same >= greedy_same, same


@pytest.mark.slow
def test_compiled_decoding_takes_the_fused_form_and_gives_the_eager_quantized_tokens(monkeypatch):
    """The demo's trained base model (random weights barely let the blocks move a greedy token), int8 and int4,
    3 role-play prompts of 53, 33 and 5 tokens left-padded into one batch, greedy: the compiled decode step gives
    the eager quantized path's tokens. It takes the fused form: with the fused form's output zeroed, the eager
    tokens stay and the compiled ones change."""
    torch._dynamo.reset()  # the compiles below count from zero, whatever ran before (the recompile limit is 8)
    tokenizer = load_tokenizer(REPO / DEMO_BASE)
    prompts = [s["input_ids"] for s in build_eval_samples(tokenizer, "roleplay_all_test", DEMO_DIR, 3, 64)]

    def quantized_demo(mode):
        model = load_model(REPO / DEMO_BASE).requires_grad_(False).eval()
        quantize_model(model, mode)
        return model

    for mode in ("int8", "int4"):
        model = quantized_demo(mode)
        eager = generate_ids(model, prompts, max_new_tokens=12)
        assert generate_ids(model, prompts, max_new_tokens=12, compiled=True) == eager
        assert [len(r) for r in eager] == [8, 7, 9]  # each ends at its own <eop>
    fused = QuantLinear.fused
    monkeypatch.setattr(QuantLinear, "fused", lambda self, x: fused(self, x) * 0)
    torch._dynamo.reset()  # the step is traced again, with the zeroed form
    assert generate_ids(model, prompts, max_new_tokens=12) == eager
    assert generate_ids(model, prompts, max_new_tokens=12, compiled=True) != eager


# ---------------------------------------------------------------- training over a quantized base

def test_lora_trains_on_int8_and_applies_to_the_float_base(tmp_path, monkeypatch):
    """LoRA over an int8 base: the loss falls; the adapter holds exactly the LoRA tensors under PEFT's names;
    it loads onto the float base without --force (its fingerprint is of the float weights) and there gives
    logits close to the int8 model's; evaluate.py --quantize int8 keeps it unmerged and generates as that model."""
    quantized = []
    monkeypatch.setattr(train, "quantize_model", lambda *a: quantized.extend(quantize_model(*a)))
    out = tmp_path / "run"
    train.main([*SMALL, "--quantize", "int8", "--method", "lora", "--target", "qkv", "--layers", "3", "--lr", "1e-2",
                "--max-steps", "30", "--batch-size", "8", "--output-dir", str(out)])
    assert len(quantized) == 24  # 6 blocks x 4 Linears; 3 of them are the bases of LoRA layers
    losses = [r["loss"] for r in train_log(out)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert sorted(load_file(str(out / "adapter_model.safetensors"))) == sorted(
        f"base_model.model.transformer.layers.{i}.attention.query_key_value.lora_{ab}.weight"
        for i in (3, 4, 5) for ab in "AB")

    base, floated, int8 = load_model("tiny"), load_model("tiny"), load_model("tiny")
    load_adapter(floated, out)
    load_adapter(int8, out)
    quantize_model(int8, "int8")
    assert isinstance(int8.transformer.layers[5].attention.query_key_value, LoRALinear)
    ids = torch.randint(10, 4096, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, plain = floated(ids), int8(ids), base(ids)
    assert (got - want).norm() / (plain - want).norm() < 0.1  # the adapter moved the logits 10x more than int8

    args = ["--model", "tiny", "--max-samples", "2", "--max-length", "48", "--max-source-length", "40",
            "--dataset", "alpaca_gpt4_zh", "--greedy", "--checkpoint", str(out), "--quantize", "int8"]
    evaluate.main(args)
    predictions = [json.loads(line)["predict"] for line in
                   (out / "eval" / "alpaca_gpt4_zh" / "generated_predictions.jsonl").read_text().splitlines()]
    int8.eval()
    assert predictions == greedy_answers(int8, load_tokenizer("tiny"), "alpaca_gpt4_zh", 2, max_length=48,
                                         max_source_length=40)
    metrics = json.loads((out / "eval" / "alpaca_gpt4_zh" / "metrics.json").read_text())
    assert metrics["model"]["quantize"] == "int8"


def test_a_quantized_lora_base_cannot_be_merged():
    model = load_model("tiny")
    apply_adapter(model, AdapterSpec(method="lora", layers=[5]))
    quantize_model(model, "int4")
    with pytest.raises(ValueError, match="cannot be merged into quantized base weights"):
        model.transformer.layers[5].attention.query_key_value.merge()


@pytest.mark.parametrize("method, mode, lr", [(["--method", "ptuning"], "int4", 0.3),
                                              (["--method", "freeze", "--target", "mlp", "--layers", "2"], "int8", 1e-2)])
def test_ptuning_and_freeze_run_over_a_quantized_base(tmp_path, method, mode, lr):
    out = tmp_path / "run"
    train.main([*SMALL, *method, "--quantize", mode, "--lr", str(lr), "--max-steps", "3", "--batch-size", "4",
                "--output-dir", str(out)])
    assert [r["step"] for r in train_log(out)] == [1, 2, 3] and all(r["loss"] > 0 for r in train_log(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    if method[1] == "ptuning":
        assert list(saved) == ["transformer.prefix_encoder.embedding.weight"]
    else:
        assert sorted(saved) == sorted(f"transformer.layers.{i}.mlp.{n}.{w}" for i in (4, 5)
                                       for n in ("dense_h_to_4h", "dense_4h_to_h") for w in ("weight", "bias"))


def test_freeze_keeps_its_trained_layers_float():
    s = train.parse_args([*SMALL, "--method", "freeze", "--target", "mlp", "--layers", "2", "--quantize", "int8"])
    model, _ = train.build_model(s.model, s.adapter, s.run, s.optim.seed, None, torch.device("cpu"))
    for i, block in enumerate(model.transformer.layers):
        mlp = (block.mlp.dense_h_to_4h, block.mlp.dense_4h_to_h)
        if i >= 4:
            assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.requires_grad for m in mlp)
        else:
            assert all(isinstance(m, QuantLinear) for m in mlp)
        assert isinstance(block.attention.query_key_value, QuantLinear) and isinstance(block.attention.dense, QuantLinear)


def test_full_and_fsdp_with_quantize_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="--method full: full fine-tuning trains every weight"):
        train.main([*SMALL, "--method", "full", "--quantize", "int8", "--output-dir", str(tmp_path / "a")])
    s = train.parse_args([*SMALL, "--quantize", "int4", "--dist", "fsdp"])
    with pytest.raises(ValueError, match="use --dist ddp"):
        train.check_quantize(s.run, s.adapter, world=2)
    train.check_quantize(s.run, s.adapter, world=1)  # one process: --dist is not used
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_ddp_over_a_quantized_base_equals_one_process(tmp_path):
    """2 ranks x batch 2 == 1 process x batch 4 on an int8 base (DDP: the quantized buffers are not resent)."""
    common = [*SMALL, "--method", "lora", "--layers", "2", "--lora-dropout", "0", "--lr", "3e-3", "--max-steps", "3",
              "--max-samples", "16", "--quantize", "int8"]
    train.main([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    cmd = torchrun_command(2, "train.py", *common, "--batch-size", "2", "--output-dir", tmp_path / "two")
    done = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


@pytest.mark.slow
def test_the_benchmarks_run_over_a_quantized_base(tmp_path):
    """bench/generate.py and bench/train.py with --quantize, as bench/gpu_check.py runs them on a GPU (here the tiny
    preset at 2 layers, on the CPU): the records name the depth and the quantization, and hold the bytes that the
    config says a quantized model has."""
    config = replace(ChatGLMConfig.from_name("tiny"), num_layers=2)
    for mode in ("none", "int4"):
        out = tmp_path / f"generate-{mode}.json"
        done = subprocess.run([sys.executable, "bench/generate.py", "--model", "tiny", "--layers", "2", "--batch-size",
                               "1", "2", "--prompt-len", "16", "--new-tokens", "4", "--quantize", mode, "--json", out],
                              cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        record = json.loads(out.read_text())
        assert (record["layers"], record["quantize"], [r["batch"] for r in record["runs"]]) == (2, mode, [1, 2])
        assert record["tensor_bytes"] == base_weight_bytes(config, torch.float32, mode)
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, "bench/train.py", "--model", "tiny", "--method", "lora", "--target", "qkv",
                           "--layers", "1", "--quantize", "int4", "--batch-size", "2", "--seq-len", "32",
                           "--steps", "1", "--warmup", "1", "--precision", "fp32", "--json", out],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert (record["quantize"], record["spec"]["method"], record["spec"]["layers"]) == ("int4", "lora", [5])
    assert record["step_ms"] > 0 and record["peak_gib"] > 0


# ---------------------------------------------------------------- the dry run's base-weights line

def test_dry_run_prints_chatglm_6b_base_weights(capsys):
    """From the config alone (meta device). Tied output matrix: 6,173,286,400 parameters; in bf16 12.35 GB =
    11.50 GiB. int8: 1 byte per block weight + a bf16 scale per row; int4: half a byte + a bf16 scale per 128."""
    V, H, F, L = 130528, 4096, 16384, 28
    rows, block_weights = 3 * H + H + F + H, 3 * H * H + H * H + 2 * F * H
    float_rest = 2 * (V * H + 2 * H + L * (4 * H + rows))  # embedding, final norm, norms and biases: bf16
    expected = {"none": 2 * 6_173_286_400, "int8": float_rest + L * (block_weights + 2 * rows),
                "int4": float_rest + L * (block_weights // 2 + 2 * block_weights // 128)}
    for mode, (low, high) in {"none": (11.4, 11.6), "int8": (6.2, 6.3), "int4": (3.6, 3.8)}.items():
        train.main(["--model", "chatglm-6b", "--dry-run", "--precision", "bf16", "--quantize", mode])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("base weights"))
        assert line == f"base weights: {expected[mode] / 2**30:.2f} GiB (bf16, {mode})"
        assert low < expected[mode] / 2**30 < high
