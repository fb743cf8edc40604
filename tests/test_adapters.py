"""Freeze, P-Tuning v2, LoRA and full fine-tuning on small random models: counts, equivalences, checkpoints."""
import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import conftest
from adapters import (METHODS, AdapterSpec, LoRALinear, add_adapter_args, apply_adapter, base_model_id, export_merged,
                      float32_trainable, load_adapter, merge_lora, parse_layers, save_adapter, trainable_report,
                      trainable_state_dict, write_peft_bin)
from adapters.export import main as export_main
from conftest import GMASK, PAD, SOP, small_config
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.generate import generate_ids
from model.loader import load_model, save_model
from runtime.files import write_json

SMALL = small_config(num_layers=4)  # a layer more than conftest's: the specs below reach layer 3

# One entry per setting worth testing; every method of adapters.dispatch.METHODS needs at least one: the
# round trips below (gradients, save/load, export) run over all of them.
SPECS = {
    "freeze-qkv": AdapterSpec("freeze", "qkv", [1, 2, 3]),
    "freeze-mlp": AdapterSpec("freeze", "mlp", [0, 1]),
    "ptuning": AdapterSpec("ptuning", pre_seq_len=5),
    "ptuning-proj": AdapterSpec("ptuning", pre_seq_len=4, prefix_projection=True),
    "lora-qkv": AdapterSpec("lora", "qkv", [1, 3], lora_rank=4, lora_alpha=16.0),
    "lora-mlp": AdapterSpec("lora", "mlp", [0, 1, 2, 3]),
    "full": AdapterSpec("full"),
}


def small_model(seed=0, std=0.2, config=SMALL):
    return conftest.small_model(config, seed, std)


def batch(seed=1, B=2, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 240, (B, T), generator=g)
    ids[:, 6], ids[:, 7] = GMASK, SOP  # a 6-token prompt, then 4 answer tokens
    return ids


@torch.no_grad()
def perturb(model, seed=3, std=0.1):
    """Move every trainable tensor away from its init, so a checkpoint that lost one would show."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def adapted(name, seed=0):
    model = small_model(seed)
    apply_adapter(model, dataclasses.replace(SPECS[name]))
    perturb(model)
    return model


# ---------------------------------------------------------------- counts at the real size

@pytest.mark.parametrize("spec, trainable", [
    (AdapterSpec("lora", "qkv", [25, 26, 27]), 393_216),
    (AdapterSpec("freeze", "mlp", [25, 26, 27]), 402_714_624),
    (AdapterSpec("ptuning", pre_seq_len=16), 3_670_016),
])
def test_trainable_counts_of_chatglm_6b_on_meta(spec, trainable):
    with torch.device("meta"):
        model = ChatGLMModel(ChatGLMConfig())
    base_total = sum(p.numel() for p in model.parameters())
    apply_adapter(model, spec)
    report = trainable_report(model)
    added = 0 if spec.method == "freeze" else trainable
    total = base_total + added
    percent = 100 * trainable / total
    assert report == f"trainable params: {trainable} || all params: {total} || trainable%: {percent:.4f}"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_default_spec_from_args_is_the_studys_lora():
    parser = argparse.ArgumentParser()
    add_adapter_args(parser)
    spec = AdapterSpec.from_args(parser.parse_args([]), 28)
    assert spec == AdapterSpec("lora", "qkv", [25, 26, 27], 8, 32.0, 0.1, None, 16, False)
    spec = AdapterSpec.from_args(parser.parse_args(["--method", "ptuning", "--prefix-projection"]), 28)
    assert (spec.layers, spec.pre_seq_len, spec.prefix_projection) == (None, 16, True)
    spec = AdapterSpec.from_args(parser.parse_args(["--lora-target", "query_key_value, 25.attention.dense"]), 28)
    assert (spec.lora_target, spec.layers) == (["query_key_value", "25.attention.dense"], None)
    spec = AdapterSpec.from_args(parser.parse_args(["--method", "freeze", "--target", "mlp", "--layers", "0-2"]), 28)
    assert spec.to_dict() == {"method": "freeze", "target": "mlp", "layers": [0, 1, 2]}
    assert AdapterSpec.from_dict(spec.to_dict()) == dataclasses.replace(AdapterSpec(), method="freeze", target="mlp",
                                                                         layers=[0, 1, 2])


def test_parse_layers():
    assert parse_layers("3", 28) == [25, 26, 27]
    assert parse_layers("3", 6) == [3, 4, 5]
    assert parse_layers("0-2", 28) == [0, 1, 2]
    assert parse_layers("25-27", 28) == [25, 26, 27]
    assert parse_layers("0,5,9", 28) == [0, 5, 9]
    assert parse_layers("9,0-1,5,5", 28) == [0, 1, 5, 9]
    assert parse_layers("all", 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"layer 27 does not exist: the model has 6 layers \(0-5\)"):
        parse_layers("0,27", 6)
    with pytest.raises(ValueError, match=r"layers 25, 26, 27 do not exist: the model has 6 layers \(0-5\)"):
        parse_layers("25-27", 6)
    with pytest.raises(ValueError, match=r"layer 9 does not exist: the model has 6 layers \(0-5\)"):
        parse_layers("0,9", 6)
    with pytest.raises(ValueError, match=r"last 7 layers: the model has 6 layers"):
        parse_layers("7", 6)
    for bad in ("0", "x", "2-1", "1-", "0,,2", "-3"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 6)


# ---------------------------------------------------------------- the table of methods

def test_every_method_in_the_table_has_a_test_entry_and_the_seams():
    assert {spec.method for spec in SPECS.values()} == set(METHODS)
    spec_fields = {f.name for f in dataclasses.fields(AdapterSpec)} - {"method"}
    for name, method in METHODS.items():
        for attr in ("TITLE", "HELP", "SETTINGS", "add_args", "settings", "apply", "to_files", "merge"):
            assert hasattr(method, attr), f"adapters/{name}.py defines no {attr}"
        assert set(method.SETTINGS) <= spec_fields, name


class FlagRecorder:
    """Stands in for an argparse group: keeps the flags a method declares."""

    def __init__(self):
        self.flags = []

    def add_argument(self, *flags, **options):
        self.flags += flags


@pytest.mark.parametrize("name", list(METHODS))
def test_a_methods_options_appear_in_help_and_its_settings_in_the_spec(name):
    parser = argparse.ArgumentParser()
    add_adapter_args(parser)
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    recorder = FlagRecorder()
    METHODS[name].add_args(recorder)
    assert all(flag in text for flag in recorder.flags), (name, recorder.flags)
    assert f"{name}: {METHODS[name].HELP}" in text
    spec = AdapterSpec.from_args(parser.parse_args(["--method", name]), SMALL.num_layers)
    assert list(spec.to_dict()) == ["method", *METHODS[name].SETTINGS]
    assert AdapterSpec.from_dict(spec.to_dict()) == spec


# ---------------------------------------------------------------- LoRA

def test_fresh_lora_leaves_logits_unchanged_bit_for_bit():
    model, ids = small_model(), batch()
    before = model(ids)
    apply_adapter(model, AdapterSpec("lora", "all", [0, 1, 2, 3]))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 16
    assert torch.equal(model(ids), before)


def test_lora_linear_computes_the_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=8.0, dropout=0.1).eval()
    assert layer.weight is base.weight and layer.scaling == 4.0
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    want = x @ w.T + b + 4.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(layer(x), want, atol=1e-6)
    # a bf16 layer with float32 LoRA tensors runs without autocast and returns bf16
    base16 = LoRALinear(nn.Linear(6, 5).to(torch.bfloat16), 2, 8.0, 0.0)
    assert base16(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_merged_lora_equals_unmerged():
    model, ids = adapted("lora-qkv"), batch()
    unmerged = model(ids)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(small_model().state_dict())
    assert (model(ids) - unmerged).abs().max() < 1e-5


def test_bad_lora_target_lists_the_models_module_names():
    model = small_model()
    with pytest.raises(ValueError) as e:
        apply_adapter(model, AdapterSpec("lora", lora_target=["query_value"]))
    msg = str(e.value)
    assert "['query_value']" in msg
    for name in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                 "transformer.layers.0.attention.query_key_value", "layers 0-3"):
        assert name in msg


def test_lora_target_names_select_by_suffix():
    model = small_model()
    apply_adapter(model, AdapterSpec("lora", lora_target=["2.attention.query_key_value", "dense_4h_to_h"]))
    names = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert names == {"transformer.layers.2.attention.query_key_value"} | {
        f"transformer.layers.{i}.mlp.dense_4h_to_h" for i in range(4)}


# ---------------------------------------------------------------- which tensors train

@pytest.mark.parametrize("name", list(SPECS))
def test_only_the_methods_tensors_get_gradients(name):
    model = adapted(name).train()
    ids = batch()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(trainable_state_dict(model))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert p.dtype == torch.float32
        else:
            assert p.grad is None, n
    method = SPECS[name].method
    if method == "freeze":
        part = "attention.query_key_value" if SPECS[name].target == "qkv" else "mlp."
        assert trainable == {n for n, _ in small_model().named_parameters()
                             if part in n and any(f"layers.{i}." in n for i in SPECS[name].layers)}
    if method == "ptuning":
        assert all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    if method == "lora":
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("name", ["lora-qkv", "freeze-mlp"])
def test_bf16_model_with_fp32_trainables_under_autocast(name):
    model = small_model().to(torch.bfloat16).train()
    apply_adapter(model, SPECS[name])
    if name == "freeze-mlp":  # the base's own tensors: trained in the base's dtype until float32_trainable
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    float32_trainable(model)
    perturb(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = batch()
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert (p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0) == p.requires_grad


# ---------------------------------------------------------------- P-Tuning v2

def test_prefix_encoder_shapes_names_and_dropout():
    model = small_model()
    apply_adapter(model, AdapterSpec("ptuning", pre_seq_len=5, prefix_projection=True))
    enc = model.transformer.prefix_encoder
    H, L = SMALL.hidden_size, SMALL.num_layers
    assert {k: tuple(v.shape) for k, v in trainable_state_dict(model).items()} == {
        "transformer.prefix_encoder.embedding.weight": (5, H),
        "transformer.prefix_encoder.trans.0.weight": (H, H), "transformer.prefix_encoder.trans.0.bias": (H,),
        "transformer.prefix_encoder.trans.2.weight": (2 * L * H, H),
        "transformer.prefix_encoder.trans.2.bias": (2 * L * H,)}
    assert (model.config.pre_seq_len, model.config.prefix_projection) == (5, True)
    assert SMALL.pre_seq_len is None  # the shared config object was not touched
    out = enc(3)
    assert out.shape == (3, 5, 2 * L * H) and out.dtype == torch.float32
    assert torch.equal(out[0], out[2])  # eval mode: no dropout
    enc.train()
    torch.manual_seed(0)
    dropped = enc(3)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert not torch.equal(dropped[0], dropped[1])  # each sequence its own mask


@pytest.mark.parametrize("name", ["ptuning", "ptuning-proj"])
def test_ptuning_cached_generation_equals_full_recompute(name):
    model = adapted(name)
    prompts = [[11, 12, 13, GMASK, SOP], [20, 21, 22, 23, 24, 25, 26, GMASK, SOP]]
    cached = generate_ids(model, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, cached):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert got == ids[len(prompt):]
    base = small_model()
    assert generate_ids(base, prompts, max_new_tokens=6) != cached  # the prefix matters
    # one cached decode step against the full forward of the same tokens
    ids = torch.tensor([prompts[1] + cached[1][:2]])
    with torch.no_grad():
        full = model(ids)[0, -1]
        cache = model.new_cache(1, ids.shape[1])
        model(ids[:, :-1], None, cache)
        step = model(ids[:, -1:], None, cache)[0, -1]
    assert (step - full).abs().max() < 1e-5


def test_prefix_with_left_padding_equals_each_sequence_alone():
    model = adapted("ptuning")
    a, b = [11, 12, 13, GMASK, SOP, 40, 41], [20, 21, 22, 23, 24, 25, GMASK, SOP, 50]
    T = max(len(a), len(b))
    ids = torch.full((2, T), PAD)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for i, s in enumerate((a, b)):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = True
    with torch.no_grad():
        padded = model(ids, mask)
        for i, s in enumerate((a, b)):
            alone = model(torch.tensor([s]))[0]
            assert (padded[i, T - len(s):] - alone).abs().max() < 1e-5


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", list(SPECS))
def test_save_then_load_restores_the_logits(name, tmp_path):
    model, ids = adapted(name), batch()
    want = model(ids)
    (tmp_path / "train.log").write_text("kept\n")
    save_adapter(model, SPECS[name], tmp_path)
    assert (tmp_path / "train.log").read_text() == "kept\n"
    assert not (tmp_path / ".adapter.tmp").exists()
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["method"] == SPECS[name].method and meta["base_model"]["id"] == base_model_id(SMALL)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    if SPECS[name].method == "lora":
        assert all(k.startswith("base_model.model.transformer.layers.") for k in saved)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["bias"]) == ("LORA", "CAUSAL_LM",
                                                                               SPECS[name].lora_rank, "none")
    else:
        assert set(saved) == set(trainable_state_dict(model))
        assert not (tmp_path / "adapter_config.json").exists()

    fresh = small_model()
    spec = load_adapter(fresh, tmp_path)
    assert spec == AdapterSpec.from_dict(SPECS[name].to_dict())
    assert torch.equal(fresh(ids), want)
    assert set(trainable_state_dict(fresh)) == set(trainable_state_dict(model))


def test_resaving_with_another_method_replaces_the_adapter_files(tmp_path):
    save_adapter(adapted("lora-qkv"), SPECS["lora-qkv"], tmp_path)
    model = adapted("freeze-qkv")
    save_adapter(model, SPECS["freeze-qkv"], tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    fresh = small_model()
    assert load_adapter(fresh, tmp_path).method == "freeze"
    assert torch.equal(fresh(batch()), model(batch()))


def manual_lora_model(A, B, scaling):
    """The base model with W + scaling * B @ A written straight into its weights (no adapter code)."""
    model = small_model()
    with torch.no_grad():
        for i in A:
            model.transformer.layers[i].attention.query_key_value.weight += scaling * B[i] @ A[i]
    return model


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_peft_written_lora_adapter_loads(layout, tmp_path):
    r, alpha, H = 4, 16, SMALL.hidden_size
    g = torch.Generator().manual_seed(5)
    A = {i: torch.randn(r, H, generator=g) * 0.1 for i in (1, 2)}
    B = {i: torch.randn(3 * H, r, generator=g) * 0.1 for i in (1, 2)}
    name = ".default.weight" if layout == "bin" else ".weight"  # with and without PEFT's adapter name
    tensors = {}
    for i in A:
        key = f"base_model.model.transformer.layers.{i}.attention.query_key_value"
        tensors[f"{key}.lora_A{name}"], tensors[f"{key}.lora_B{name}"] = A[i], B[i]
    if layout == "bin":
        torch.save(tensors, tmp_path / "adapter_model.bin")
    else:
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    write_json(tmp_path / "adapter_config.json", {
        "base_model_name_or_path": "THUDM/chatglm-6b", "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
        "inference_mode": True, "lora_alpha": alpha, "lora_dropout": 0.1, "merge_weights": False,
        "modules_to_save": None, "peft_type": "LORA", "r": r, "target_modules": ["query_key_value"],
        "task_type": "CAUSAL_LM"})
    model = small_model()
    spec = load_adapter(model, tmp_path)
    assert (spec.method, spec.lora_rank, spec.lora_alpha) == ("lora", r, alpha)
    ids = batch()
    want = manual_lora_model(A, B, alpha / r)(ids)
    assert (model(ids) - want).abs().max() < 1e-5
    assert (want - small_model()(ids)).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("projection", [False, True])
def test_reference_ptuning_checkpoint_loads_with_inferred_settings(projection, tmp_path):
    source = small_model()
    apply_adapter(source, AdapterSpec("ptuning", pre_seq_len=7, prefix_projection=projection))
    perturb(source)
    # the reference trainer saves the trainable tensors, in fp16, as pytorch_model.bin
    torch.save({k: v.half() for k, v in trainable_state_dict(source).items()}, tmp_path / "pytorch_model.bin")
    model = small_model()
    spec = load_adapter(model, tmp_path)
    assert (spec.method, spec.pre_seq_len, spec.prefix_projection) == ("ptuning", 7, projection)
    for k, v in trainable_state_dict(model).items():
        assert torch.equal(v, trainable_state_dict(source)[k].half().float())


def test_adapter_for_another_base_model_is_a_clear_error(tmp_path):
    save_adapter(adapted("lora-qkv"), SPECS["lora-qkv"], tmp_path / "ours")
    other = small_model(config=dataclasses.replace(SMALL, hidden_size=32))
    with pytest.raises(ValueError, match=r"adapter made for base \w+ \(hidden 64, 4 layers.*but the model is \w+ "
                                         r"\(hidden 32, 4 layers"):
        load_adapter(other, tmp_path / "ours")
    # without adapter.json (a PEFT adapter) the shapes tell
    (tmp_path / "ours" / "adapter.json").unlink()
    with pytest.raises(ValueError, match=r"made for another base model \(this one: hidden 32"):
        load_adapter(small_model(config=dataclasses.replace(SMALL, hidden_size=32)), tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(small_model(), tmp_path)


def test_base_model_id_ignores_pre_seq_len():
    assert base_model_id(SMALL) == base_model_id(dataclasses.replace(SMALL, pre_seq_len=16))
    assert base_model_id(SMALL) != base_model_id(dataclasses.replace(SMALL, pad_token_id=0))


# ---------------------------------------------------------------- merge and export

@pytest.mark.parametrize("name", list(SPECS))
def test_export_merged_checkpoint_gives_the_adapter_models_logits(name, tmp_path):
    base = tmp_path / "base"
    save_model(small_model().state_dict(), SMALL, base, tokenizer_file=None)
    (base / "ice_text.model").write_bytes(b"tokenizer bytes")
    model, ids = adapted(name), batch()
    save_adapter(model, SPECS[name], tmp_path / "adapter")
    if METHODS[SPECS[name].method].merge is None:
        with pytest.raises(ValueError, match="adapter cannot be merged into the weights"):
            export_merged(base, tmp_path / "adapter", tmp_path / "merged")
        return
    export_merged(base, tmp_path / "adapter", tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    assert (merged(ids) - model(ids)).abs().max() < 1e-5
    assert (tmp_path / "merged" / "ice_text.model").read_bytes() == b"tokenizer bytes"
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["hidden_size"] == SMALL.hidden_size


def test_export_of_the_tiny_preset_brings_the_demo_tokenizer(tmp_path):
    from model.tokenizer import DEMO_TOKENIZER
    if not DEMO_TOKENIZER.is_file():
        pytest.skip(f"{DEMO_TOKENIZER} not built")
    model = load_model("tiny", seed=5)  # stands in for the demo's fully trained base
    apply_adapter(model, AdapterSpec("full"))
    save_adapter(model, AdapterSpec("full"), tmp_path / "base-train")
    export_main(["--model", "tiny", "--checkpoint", str(tmp_path / "base-train"), "--output", str(tmp_path / "base")])
    ids = torch.tensor([[20, 21, 22, 5, 8, 30]])
    assert torch.equal(load_model(tmp_path / "base")(ids), model(ids))
    assert (tmp_path / "base" / "ice_text.model").read_bytes() == DEMO_TOKENIZER.read_bytes()


def test_export_cli_and_ptuning_refusal(tmp_path):
    base = save_model(small_model().state_dict(), SMALL, tmp_path / "base")
    model = adapted("lora-mlp")
    save_adapter(model, SPECS["lora-mlp"], tmp_path / "lora")
    export_main(["--model", str(base), "--adapter", str(tmp_path / "lora"), "--output", str(tmp_path / "out"),
                 "--precision", "bf16"])
    merged = load_model(tmp_path / "out")
    assert (merged(batch()) - model(batch())).abs().max() < 0.1  # bf16 weights
    save_adapter(adapted("ptuning"), SPECS["ptuning"], tmp_path / "pt")
    with pytest.raises(ValueError, match="P-Tuning v2 adapter cannot be merged"):
        export_merged(base, tmp_path / "pt", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_export_config_and_the_base_code_are_what_transformers_needs(tied, tmp_path):
    # transformers (AutoModel, trust_remote_code) reads auto_map to find the released .py files beside the weights,
    # and ties lm_head to the embedding when tie_word_embeddings is missing: every key must be written
    config = dataclasses.replace(SMALL, tie_word_embeddings=tied)
    base = tmp_path / "base"
    save_model({k: v.half() for k, v in small_model(config=config).state_dict().items()}, config, base)
    released = {n: f"# {n} of the release\n" for n in ("configuration_chatglm.py", "modeling_chatglm.py",
                                                        "tokenization_chatglm.py", "quantization.py")}
    released["tokenizer_config.json"] = '{"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", null]}}'
    for name, text in released.items():
        (base / name).write_text(text)
    (base / "ice_text.model").write_bytes(b"tokenizer bytes")
    model = load_model(base)  # float32 of the stored float16 weights
    apply_adapter(model, dataclasses.replace(SPECS["lora-qkv"]))
    perturb(model)
    save_adapter(model, SPECS["lora-qkv"], tmp_path / "lora")
    export_merged(base, tmp_path / "lora", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["torch_dtype"] == "float16"
    assert cfg["architectures"] == ["ChatGLMModel"] and cfg["model_type"] == "chatglm"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                               "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                               "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    for name, text in released.items():  # the base's tokenizer_config.json replaces ours
        assert (tmp_path / "out" / name).read_text() == text
    merged = load_model(tmp_path / "out")
    assert merged.config.tie_word_embeddings is tied
    assert (merged(batch()) - model(batch())).abs().max() < 0.01  # merged weights rounded to float16 (effect: 2)


# ---------------------------------------------------------------- PEFT <= 0.3: adapter_model.bin

def test_peft_bin_holds_the_safetensors_tensors_and_loads_alone(tmp_path):
    model, ids = adapted("lora-qkv"), batch()
    save_adapter(model, SPECS["lora-qkv"], tmp_path)
    export_main(["--peft-bin", str(tmp_path)])
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    written = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert list(written) == list(saved) and all(torch.equal(written[k], saved[k]) for k in saved)
    (tmp_path / "adapter_model.safetensors").unlink()
    for files in ("adapter.json + adapter_config.json + .bin", "adapter_config.json + .bin (what PEFT 0.3 reads)"):
        fresh = small_model()
        assert load_adapter(fresh, tmp_path).method == "lora", files
        assert torch.equal(fresh(ids), model(ids)), files
        (tmp_path / "adapter.json").unlink(missing_ok=True)


def test_peft_bin_follows_a_resave_and_is_lora_only(tmp_path):
    save_adapter(adapted("lora-qkv"), SPECS["lora-qkv"], tmp_path)
    write_peft_bin(tmp_path)
    save_adapter(adapted("lora-qkv", seed=1), SPECS["lora-qkv"], tmp_path)  # new weights: the .bin follows
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    written = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert all(torch.equal(written[k], saved[k]) for k in saved)
    save_adapter(adapted("freeze-qkv"), SPECS["freeze-qkv"], tmp_path)  # another method: no PEFT files left
    assert not (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="a Freeze adapter; only LoRA adapters have PEFT's layout"):
        write_peft_bin(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected a LoRA adapter"):
        write_peft_bin(tmp_path / "nothing")
    with pytest.raises(SystemExit):
        export_main(["--peft-bin", str(tmp_path), "--model", "tiny"])


def test_loaded_adapters_run_in_a_bf16_model_without_autocast(tmp_path):
    for name in ("freeze-qkv", "lora-qkv", "ptuning"):
        save_adapter(adapted(name), SPECS[name], tmp_path / name)
        model = small_model().to(torch.bfloat16)
        load_adapter(model, tmp_path / name)
        out = generate_ids(model, [[11, 12, GMASK, SOP]], max_new_tokens=3)
        assert len(out[0]) == 3
