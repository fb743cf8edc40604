"""The network, loader, tokenizer and generation on small random checkpoints in the released layout."""
import json

import pytest
import torch

from conftest import EOP, GMASK, PAD, SMALL, SOP, generate, rotary_buffers, small_config, small_model, write_bin_shards
from model.chatglm import ChatGLMModel
from model.config import ChatGLMConfig
from model.generate import generate_ids, left_pad
from model.loader import load_model, save_model
from model.tokenizer import load_tokenizer
from runtime.files import write_json

TIED = small_config(tie_word_embeddings=True)


def released_state_dict(model):
    """Our state dict plus what the released checkpoint also stores, in fp16 like the release: the rotary
    buffers and, for a tied model, the output matrix a second time under lm_head.weight."""
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd.setdefault("lm_head.weight", sd["transformer.word_embeddings.weight"].clone())
    sd.update(rotary_buffers(SMALL))
    return sd


def prompt(*tokens):
    return list(tokens) + [GMASK, SOP]


# ---------------------------------------------------------------- loader

def test_bin_shards_and_safetensors_load_bit_exactly(tmp_path):
    model = small_model()
    sd = released_state_dict(model)
    bin_dir = write_bin_shards(sd, SMALL, tmp_path / "bin")
    st_dir = save_model(sd, SMALL, tmp_path / "st", max_shard_bytes=20_000)
    assert len(json.loads((st_dir / "model.safetensors.index.json").read_text())["weight_map"]) == len(sd)
    assert len(list(st_dir.glob("model-*.safetensors"))) > 1
    torch.save(sd, (tmp_path / "single").mkdir() or tmp_path / "single" / "pytorch_model.bin")
    write_json(tmp_path / "single" / "config.json", SMALL.to_dict())
    for d in (bin_dir, st_dir, tmp_path / "single"):
        loaded = load_model(d, dtype=torch.float16)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), (d, k)
    loaded32 = load_model(st_dir)
    assert loaded32.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded32.lm_head.weight, sd["lm_head.weight"].float())


def test_loader_errors_name_file_and_keys(tmp_path):
    sd = released_state_dict(small_model())
    cases = {
        "missing": {k: v for k, v in sd.items() if k != "transformer.layers.1.mlp.dense_4h_to_h.weight"},
        "extra": {**sd, "transformer.layers.9.mlp.extra.weight": torch.zeros(2)},
        "shape": {**sd, "transformer.final_layernorm.weight": torch.zeros(65)},
    }
    expected = {"missing": "transformer.layers.1.mlp.dense_4h_to_h.weight",
                "extra": "transformer.layers.9.mlp.extra.weight", "shape": "transformer.final_layernorm.weight"}
    for name, bad in cases.items():
        d = write_bin_shards(bad, SMALL, tmp_path / name, n_shards=1)
        with pytest.raises(ValueError, match=expected[name]):
            load_model(d)
    d = write_bin_shards(sd, SMALL, tmp_path / "truncated", n_shards=2)
    shard = d / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin"):
        load_model(d)
    st = save_model(sd, SMALL, tmp_path / "st_trunc")
    f = next(st.glob("model-*.safetensors"))
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f.name):
        load_model(st)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_chatglm6b_preset_parameter_count_on_meta():
    """Tied (the preset, as transformers loads the release): one V x H matrix; untied: two."""
    H, F, V, L = 4096, 16384, 130528, 28
    per_layer = 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (F * H + F) + (H * F + H)
    for tied, matrices, expected in ((True, 1, 6_173_286_400), (False, 2, 6_707_929_088)):
        cfg = ChatGLMConfig.from_name("chatglm-6b")
        cfg.tie_word_embeddings = tied
        with torch.device("meta"):
            model = ChatGLMModel(cfg)
        assert sum(p.numel() for p in model.parameters()) == matrices * V * H + L * per_layer + 2 * H == expected
        assert (model.lm_head.weight is model.transformer.word_embeddings.weight) == tied


def test_tied_by_default_and_a_stored_lm_head_must_equal_the_embedding(tmp_path):
    """config.json without tie_word_embeddings -> tied (transformers' default); the released layout stores
    lm_head.weight too: equal -> loads; different -> an error naming the file and the fix."""
    assert ChatGLMConfig().tie_word_embeddings and ChatGLMConfig.from_name("chatglm-6b").tie_word_embeddings
    assert not ChatGLMConfig.from_name("tiny").tie_word_embeddings  # decided in PRESETS
    sd = released_state_dict(ChatGLMModel(TIED).init_weights(0))
    d = write_bin_shards(sd, SMALL, tmp_path / "equal", n_shards=2)
    raw = json.loads((d / "config.json").read_text())
    del raw["tie_word_embeddings"]  # SMALL's false
    write_json(d / "config.json", raw)
    model = load_model(d)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].float())
    assert "lm_head.weight" not in dict(model.named_parameters()) and "lm_head.weight" not in model.state_dict()

    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    for order, stored in (("after", sd), ("before", {"lm_head.weight": sd["lm_head.weight"], **sd})):
        # lm_head.weight read after / before the embedding
        d = write_bin_shards(stored, SMALL, tmp_path / order, n_shards=2)
        write_json(d / "config.json", raw)
        with pytest.raises(ValueError, match=r"pytorch_model-.*\.bin: lm_head.weight and transformer.word_embeddings"
                                             r".weight hold different values.*\"tie_word_embeddings\": false in "
                                             r".*config.json"):
            load_model(d)


def test_untied_config_keeps_two_matrices_and_saving_states_the_key(tmp_path):
    model = small_model()
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight
    assert not torch.equal(model.lm_head.weight, model.transformer.word_embeddings.weight)
    d = save_model(model.state_dict(), SMALL, tmp_path / "untied")
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_model(d)
    assert not loaded.config.tie_word_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    tied = small_model(TIED)
    d = save_model(tied.state_dict(), TIED, tmp_path / "tied")  # one matrix on disk
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    loaded = load_model(d)
    assert torch.equal(loaded.lm_head.weight, tied.lm_head.weight)
    torch.testing.assert_close(loaded(torch.tensor([prompt(10, 11)])), tied(torch.tensor([prompt(10, 11)])))


# ---------------------------------------------------------------- forward semantics

def test_prompt_is_bidirectional_and_answer_is_causal():
    model = small_model()
    ids = torch.tensor([prompt(10, 11, 12, 13) + [20, 21, 22, 23]])
    base = model(ids)[0]
    changed = ids.clone()
    changed[0, 2] = 99  # a prompt token: every position sees it
    diff = (model(changed)[0] - base).abs().amax(dim=-1)
    assert (diff > 1e-4).all()
    t = 7  # answer token at index 7: positions before it are unchanged
    changed = ids.clone()
    changed[0, t] = 99
    diff = (model(changed)[0] - base).abs().amax(dim=-1)
    assert (diff[:t] == 0).all() and (diff[t:] > 1e-4).all()


def test_left_padded_batch_equals_each_sequence_alone():
    model = small_model()
    seqs = [prompt(10, 11, 12, 13, 14) + [30, 31], prompt(40) + [50, 51, 52], prompt(60, 61, 62)]
    ids, mask = left_pad(seqs, PAD)
    batch = model(ids, mask)
    for i, s in enumerate(seqs):
        alone = model(torch.tensor([s]))[0]
        torch.testing.assert_close(batch[i, -len(s):], alone, atol=1e-5, rtol=0)


def test_cached_decoding_equals_full_recomputation_with_padding():
    model = small_model()
    seqs = [prompt(10, 11, 12, 13, 14), prompt(40)]
    answer = torch.tensor([[30, 31, 32], [50, 51, 52]])
    ids, mask = left_pad(seqs, PAD)
    full = model(torch.cat([ids, answer], 1), torch.cat([mask, torch.ones_like(answer)], 1))
    cache = model.new_cache(2, ids.shape[1] + 3)
    steps = [model(ids, mask, cache)[:, -1]]
    for t in range(2):
        steps.append(model(answer[:, t:t + 1], None, cache)[:, -1])
    for t, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 + t], atol=1e-5, rtol=1e-5)


def test_logits_at_selects_positions():
    model = small_model()
    ids = torch.tensor([prompt(10, 11) + [20, 21], prompt(12, 13) + [22, 23]])
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, 3], at[1, 5] = True, True
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_at=at), torch.stack([full[0, 3], full[1, 5]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(dtype):
    model = small_model(std=0.1)
    ids = torch.tensor([prompt(10, 11, 12) + [20, 21]])
    ref = model(ids)
    low = model.to(dtype)(ids)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------- generation

def test_greedy_batch_generation_equals_one_by_one_and_stops_at_eop():
    model = small_model()
    prompts = [prompt(10, 11, 12, 13, 14, 15), prompt(40), prompt(60, 61, 62)]
    batch = generate_ids(model, prompts, max_new_tokens=12)
    alone = [generate_ids(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batch == alone
    assert all(0 < len(r) <= 12 for r in batch)
    with torch.no_grad():  # make <eop> the argmax everywhere: every sequence stops after one token
        model.lm_head.weight[EOP] = model.lm_head.weight[EOP] * 0 + 5 * model.lm_head.weight.abs().max()
        model.transformer.final_layernorm.bias.fill_(1.0)
        model.transformer.final_layernorm.weight.fill_(0.0)
    assert generate_ids(model, prompts, max_new_tokens=12) == [[EOP]] * 3


def test_max_length_caps_prompt_plus_answer():
    model = small_model()
    prompts = [prompt(10, 11, 12, 13, 14, 15), prompt(40)]
    rows = generate_ids(model, prompts, max_new_tokens=50, max_length=12)
    assert [len(p) + len(r) <= 12 for p, r in zip(prompts, rows)] == [True, True]


def test_sampling_is_reproducible_and_batch_independent():
    model = small_model()
    prompts = [prompt(10, 11, 12), prompt(40, 41)]
    a = generate_ids(model, prompts, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, seeds=[7, 8])
    b = generate_ids(model, prompts, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, seeds=[7, 8])
    c = generate_ids(model, prompts[1:], max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, seeds=[8])
    greedy = generate_ids(model, prompts, max_new_tokens=10)
    assert a == b and a[1] == c[0] and a != greedy


# ---------------------------------------------------------------- tokenizer

TEXTS = ["你好，世界", "line one\nline two\n\nend", "tab\there\t\tand", "emoji 😀👍 and 中文 mixed English 123",
         "a" + " " * 2 + "b" + " " * 5 + "c" + " " * 80 + "d" + " " * 81 + "e" + " " * 100 + "f",
         "  leading and trailing  ", "问：今天天气怎么样？\n答：很好。"]


def test_tokenizer_round_trips():
    tok = load_tokenizer("tiny")
    for text in TEXTS + [" " * k for k in range(2, 101)]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, repr(text)
        assert tok.decode(ids + [tok.pad_id, tok.pad_id]) == text
        assert tok.encode(text) == ids + [tok.gmask_id, tok.sop_id]


def test_tokenizer_preprocessing_pieces():
    tok = load_tokenizer("tiny")
    ids = tok.encode("a\nb\tc" + " " * 7 + "d", add_special_tokens=False)
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert "<n>" in pieces and "<|tab|>" in pieces and "<|blank_7|>" in pieces


def test_tokenizer_ids_checked_against_config(tmp_path):
    tok = load_tokenizer("tiny")
    cfg = ChatGLMConfig.from_name("tiny")
    cfg.eos_token_id = 10
    d = tmp_path / "ckpt"
    d.mkdir()
    write_json(d / "config.json", cfg.to_dict())
    (d / "ice_text.model").write_bytes(open(tok.model_file, "rb").read())
    with pytest.raises(ValueError, match="eos_token_id=10.*<eop> at id 9"):
        load_tokenizer(d)


def test_generate_strings_on_tiny_preset():
    model, tok = load_model("tiny"), load_tokenizer("tiny")
    out = generate(model, tok, ["你好", "今天天气怎么样？"], max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    ids = generate_ids(model, [tok.encode("你好")], max_new_tokens=5)[0]
    assert out[0] == tok.decode(ids, skip_special_tokens=True)


def test_left_pad():
    ids, mask = left_pad([[7, 8, 9], [8, 9], []], pad_id=3)
    assert ids.tolist() == [[7, 8, 9], [3, 8, 9], [3, 3, 3]]
    assert mask.tolist() == [[True] * 3, [False, True, True], [False] * 3]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
