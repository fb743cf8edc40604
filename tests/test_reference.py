"""Our ChatGLM against numbers the reference implementation computed on the same seeded tiny checkpoint.

How the figures in `reference/chatglm_tiny.json` were produced (its "produced_by" says the same): computed
outside this repository with THUDM/chatglm-6b's modeling_chatglm.py / configuration_chatglm.py /
tokenization_chatglm.py at revision 35ca52301fbedee885b0838da5d15b7b47faa37c (the 130528-vocabulary code, pinned
in shared/docs/chatglm6b.md; file texts read from a public mirror of that code) under transformers 4.30.2
(+ PEFT 0.3.0 for LoRA), torch 2.13.0, float32, CPU, on the checkpoint that `tiny_state_dict` below builds.
The reference was loaded with `from_pretrained`, which ties lm_head to the embedding; the checkpoint stores the
two equal, so tied or not gives the same numbers. Left-padded batches were fed the masks and 2D positions of the
reference tokenizer's `_pad`. The reference code is not in this repository, only its figures. Do not edit the
figures by hand: if the model changes on purpose, they must be recomputed by the reference, not by this code.

The checkpoint: vocabulary 130528 with the released special ids, hidden 64, 2 heads, 3 layers, inner 256;
weights from an integer hash of (tensor name, index), so no RNG and the same bits on any torch; stored in
float16 like the release. What each part guards: depth 3 makes the residual scale observable (the reference
uses sqrt(2 * 28) at any depth); the 162-token sequence has positions past 100 (float16 rounding of the rotary
inv_freq); P-Tuning's unrotated prefix keys make absolute positions observable in left-padded rows (without a
prefix, shifting every position of a row by the same amount cannot change rotary attention).

Measured on this code (torch 2.13 CPU, float32), max abs difference to the reference: logits summaries 3.9e-6
(single, left-padded and P-Tuning alike), loss 1.4e-8, LoRA loss 4.9e-8, LoRA gradients 4.0e-7; greedy
continuations and tokenizer ids identical.
"""
import functools
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapters import AdapterSpec, apply_adapter
from conftest import REPO, rotary_buffers, write_bin_shards
from model.config import ChatGLMConfig
from model.generate import generate_ids, left_pad
from model.loader import load_model
from model.tokenizer import load_tokenizer


FIXTURE = Path(__file__).resolve().parent / "reference" / "chatglm_tiny.json"
REF = json.loads(FIXTURE.read_text(encoding="utf-8"))
CONFIG = ChatGLMConfig(**REF["config"])
TOL = 1e-4  # max abs, float32
IGNORE = -100
M32 = 0xFFFFFFFF
REGENERATE = ("The figures come from the reference implementation (see the module docstring); they cannot be "
              "recomputed by this repository's code.")


# ---------------------------------------------------------------- the seeded checkpoint (the reference run used
# exactly this generator; the checksums in the fixture prove it)

def hashed_uniform(name, shape, lo, hi):
    """Values in [lo, hi) from an integer hash of (name, flat index): exact integer arithmetic, no RNG."""
    n = math.prod(shape)
    x = (torch.arange(n, dtype=torch.int64) * 2654435761 + zlib.crc32(name.encode())) & M32
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & M32
    x = x ^ (x >> 16)
    return (lo + (hi - lo) * (x.double() / 2.0 ** 32)).reshape(shape)  # float64


def weight_range(key):
    if key == "transformer.final_layernorm.weight":
        return -1.5, 1.5  # mixed signs: with lm_head equal to the embedding, the next token is not the current one
    if key.endswith("layernorm.weight"):
        return 0.8, 1.2
    if key.endswith("bias"):
        return -0.1, 0.1
    if key.endswith("word_embeddings.weight"):
        return -0.5, 0.5
    if key.endswith("dense_4h_to_h.weight"):
        return -0.15, 0.15
    return -0.3, 0.3


@functools.cache
def tiny_state_dict():
    """Released key names and shapes, float16 like the release; lm_head.weight equals the embedding. (Cached:
    callers must not modify it.)"""
    H, Fi, L, V = CONFIG.hidden_size, CONFIG.inner_hidden_size, CONFIG.num_layers, CONFIG.vocab_size
    shapes = {"transformer.word_embeddings.weight": (V, H)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
                       p + "attention.query_key_value.weight": (3 * H, H),
                       p + "attention.query_key_value.bias": (3 * H,),
                       p + "attention.dense.weight": (H, H), p + "attention.dense.bias": (H,),
                       p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,),
                       p + "mlp.dense_h_to_4h.weight": (Fi, H), p + "mlp.dense_h_to_4h.bias": (Fi,),
                       p + "mlp.dense_4h_to_h.weight": (H, Fi), p + "mlp.dense_4h_to_h.bias": (H,)})
    shapes.update({"transformer.final_layernorm.weight": (H,), "transformer.final_layernorm.bias": (H,)})
    # float64 -> float32 -> float16, each rounded to nearest even: the same bits on any torch
    sd = {k: hashed_uniform(k, s, *weight_range(k)).float().half() for k, s in shapes.items()}
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()
    return sd


def checksum_mismatches(sd):
    out = []
    for k, (ref_sum, ref_sq) in REF["checksums"].items():
        if k not in sd:
            out.append(f"{k}: not generated")
            continue
        s, sq = float(sd[k].double().sum()), float(sd[k].double().pow(2).sum())
        if abs(s - ref_sum) > 1e-6 * max(1.0, abs(ref_sum)) or abs(sq - ref_sq) > 1e-6 * max(1.0, ref_sq):
            out.append(f"{k}: sum {s:.6f} / sum of squares {sq:.6f}, reference run had {ref_sum} / {ref_sq}")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint in the released layout: float16 .bin shards + index + config.json (+ inv_freq buffers)."""
    sd = dict(tiny_state_dict())
    bad = checksum_mismatches(sd)
    assert not bad, ("the seeded checkpoint differs from the one the reference figures were computed on, so every "
                     "comparison below would be meaningless: " + "; ".join(bad[:4]))
    sd.update(rotary_buffers(CONFIG))
    return write_bin_shards(sd, CONFIG, tmp_path_factory.mktemp("chatglm_tiny"), n_shards=2)


@pytest.fixture(scope="module")
def base(checkpoint):
    return load_model(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def projection():
    return hashed_uniform("logit projection", (2, CONFIG.vocab_size), -1.0, 1.0)  # (2, V) float64


# ---------------------------------------------------------------- comparing logits with the reference's summaries

def worst_difference(logits, ref, projection):
    """logits (T, V) of ours vs the reference's per-position summary -> (max abs diff, where, ours, reference).

    Compared per position: logsumexp over the vocabulary, the max, our logits at the reference's top-5 ids
    (ids, not order: near-ties may reorder), and two fixed projections of the whole row (means)."""
    lf = logits.detach().double()
    ours = {"lse": torch.logsumexp(lf, -1), "max": lf.max(-1).values,
            "top5": lf.gather(1, torch.tensor(ref["top5_ids"])),
            "proj": lf @ projection.T / lf.shape[-1]}  # (T, 2)
    theirs = {"lse": ref["lse"], "max": ref["max"], "top5": ref["top5"], "proj": ref["proj"]}
    worst = (0.0, "", 0.0, 0.0)
    for key, ref_values in theirs.items():
        ref_t = torch.tensor(ref_values, dtype=torch.float64)
        diff = (ours[key] - ref_t).abs()
        d = float(diff.max())
        if d > worst[0]:
            idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
            worst = (d, f"{key} at position {idx[0]}" + (f", entry {idx[1]}" if len(idx) > 1 else ""),
                     float(ours[key][idx]), float(ref_t[idx]))
    return worst


def assert_matches(logits, ref, projection, what):
    d, where, ours, theirs = worst_difference(logits, ref, projection)
    assert d <= TOL, (f"{what}: logits differ from the reference implementation by {d:.3g} (> {TOL}) in {where}: "
                      f"ours {ours:.6f}, reference {theirs:.6f}. Likely causes: residual scale "
                      f"(REFERENCE_ALPHA_LAYERS), rotary inv_freq rounding, 2D positions or the prefix-LM mask. "
                      + REGENERATE)
    return d


# ---------------------------------------------------------------- the tests

def test_seeded_checkpoint_is_the_one_the_reference_saw():
    assert REF["config"]["vocab_size"] == 130528 and REF["config"]["num_layers"] != 28
    bad = checksum_mismatches(tiny_state_dict())
    assert not bad, "weight generation changed; the reference figures no longer apply: " + "; ".join(bad[:4])


@pytest.mark.parametrize("name", ["short", "long", "mask"])
@torch.no_grad()
def test_logits_single_sequence(base, projection, name):
    # short: prompt [gMASK] <sop> answer; long: 162 tokens, positions past 100 (rotary inv_freq rounding);
    # mask: [MASK] without [gMASK], answer positions take the [MASK] index
    ref = REF["single"][name]
    logits = base(torch.tensor([ref["ids"]]))[0]
    assert_matches(logits, ref, projection, f"single sequence {name!r} ({len(ref['ids'])} tokens)")


@torch.no_grad()
def test_logits_left_padded_batch(base, projection):
    # the reference got masks and positions from its tokenizer's _pad: positions count from each row's first
    # real token. (A uniform shift of a row's positions is invisible here, rotary being relative; an answer
    # position shifted against the prompt's is not. The P-Tuning test sees absolute positions.)
    ref = REF["padded"]
    ids, mask = left_pad(ref["seqs"], CONFIG.pad_token_id)
    logits = base(ids, mask)
    T = ids.shape[1]
    for i, s in enumerate(ref["seqs"]):
        assert_matches(logits[i, T - len(s):], ref["rows"][i], projection, f"left-padded batch, row {i}")


def token_loss(model, ids, labels):
    """The plain training loss: mean over label tokens of the cross-entropy of logits shifted by one."""
    logits = model(ids, ids != CONFIG.pad_token_id)  # right padding
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


@torch.no_grad()
def test_training_loss(base):
    ref = REF["loss"]
    loss = float(token_loss(base, torch.tensor(ref["input_ids"]), torch.tensor(ref["labels"])))
    assert abs(loss - ref["loss"]) <= TOL, (f"training loss {loss:.7f}, the reference's forward(labels=...) gave "
                                            f"{ref['loss']:.7f} on the same right-padded batch. " + REGENERATE)


def test_lora_loss_and_gradients(checkpoint):
    # PEFT 0.3.0 on the reference: r 8, alpha 32, dropout 0, query_key_value of every layer, A and B from the hash
    ref = REF["lora"]
    model = load_model(checkpoint, dtype=torch.float32)
    apply_adapter(model, AdapterSpec("lora", "qkv", list(range(CONFIG.num_layers)), lora_rank=ref["rank"],
                                     lora_alpha=float(ref["alpha"]), lora_dropout=0.0))
    with torch.no_grad():
        for i, layer in enumerate(model.transformer.layers):
            qkv = layer.attention.query_key_value
            for which, lin in (("A", qkv.lora_A), ("B", qkv.lora_B)):
                lin.weight.copy_(hashed_uniform(f"lora {i} {which}", tuple(lin.weight.shape), -0.1, 0.1).float())
    loss = token_loss(model, torch.tensor(REF["loss"]["input_ids"]), torch.tensor(REF["loss"]["labels"]))
    loss.backward()
    assert abs(loss.item() - ref["loss"]) <= TOL, f"LoRA loss {loss.item():.7f}, reference {ref['loss']:.7f}"
    for key, r in ref["grads"].items():
        i, which = key.split(".")
        qkv = model.transformer.layers[int(i)].attention.query_key_value
        g = (qkv.lora_A if which == "A" else qkv.lora_B).weight.grad.double()
        ours = {"sum": float(g.sum()), "sumsq": float(g.pow(2).sum()), "abs_max": float(g.abs().max()),
                **{f"[{a},{b}]": float(g[a, b]) for a, b, _ in r["elements"]}}
        theirs = {"sum": r["sum"], "sumsq": r["sumsq"], "abs_max": r["abs_max"],
                  **{f"[{a},{b}]": v for a, b, v in r["elements"]}}
        for stat, v in theirs.items():
            assert abs(ours[stat] - v) <= 1e-5, (f"LoRA gradient of layers.{i}...lora_{which}: {stat} is "
                                                 f"{ours[stat]:.9f}, PEFT on the reference gave {v:.9f}")


def test_greedy_continuations_alone_and_left_padded(base):
    # the reference's generate(do_sample=False): each prompt alone, then all three left-padded (masks and
    # positions from its tokenizer's _pad); its smallest top-1/top-2 margin was > 1e-3, so ties cannot flip a token
    ref = REF["greedy"]
    assert ref["min_top2_margin"] > 1e-3, "fixture: greedy continuations too close to a tie to compare"
    n = ref["max_new_tokens"]
    alone = [generate_ids(base, [p], max_new_tokens=n)[0] for p in ref["prompts"]]
    assert alone == ref["alone"], (f"greedy continuations of single prompts differ:\n"
                                   f"ours      {alone}\nreference {ref['alone']}")
    batch = generate_ids(base, ref["prompts"], max_new_tokens=n)
    assert batch == ref["batch"], (f"greedy continuations of a left-padded batch differ:\n"
                                   f"ours      {batch}\nreference {ref['batch']}")


@pytest.mark.parametrize("variant", ["plain", "projection"])
def test_ptuning_logits_and_greedy(checkpoint, projection, variant):
    ref = REF["ptuning"][variant]
    model = load_model(checkpoint, dtype=torch.float32)
    apply_adapter(model, AdapterSpec("ptuning", pre_seq_len=4, prefix_projection=variant == "projection"))
    model.eval()
    encoder = dict(model.transformer.prefix_encoder.named_parameters())
    assert {k: list(v.shape) for k, v in encoder.items()} == ref["encoder_shapes"], "prefix encoder layout differs"
    with torch.no_grad():
        for k, p in encoder.items():
            lo, hi = (-1.0, 1.0) if k == "embedding.weight" else ((-0.1, 0.1) if k.endswith("bias") else (-0.2, 0.2))
            p.copy_(hashed_uniform(f"prefix {variant == 'projection'} {k}", tuple(p.shape), lo, hi).float())
        assert_matches(model(torch.tensor([REF["single"]["short"]["ids"]]))[0], ref["short"], projection,
                       f"P-Tuning ({variant}), single sequence")
        seqs = REF["padded"]["seqs"][:2]
        ids, mask = left_pad(seqs, CONFIG.pad_token_id)
        logits = model(ids, mask)
        for i, s in enumerate(seqs):
            assert_matches(logits[i, ids.shape[1] - len(s):], ref["padded"][i], projection,
                           f"P-Tuning ({variant}), left-padded row {i}")
    out = generate_ids(model, [REF["greedy"]["prompts"][0]], max_new_tokens=len(ref["greedy"]))[0]
    assert out == ref["greedy"], (f"P-Tuning ({variant}) greedy with the KV cache differs:\n"
                                  f"ours      {out}\nreference {ref['greedy']}")


def test_tokenizer_ids_and_decode():
    # the bundled demo ice_text.model read by the reference ChatGLMTokenizer (num_image_tokens 0, as released)
    ref = REF["tokenizer"]
    tok = load_tokenizer(REPO / ref["model_file"])
    for text, ids, decoded in zip(ref["texts"], ref["ids"], ref["decoded"]):
        assert tok.encode(text) == ids, f"encode({text!r}): ours {tok.encode(text)}, reference {ids}"
        assert tok.encode(text, add_special_tokens=False) == ids[:-2], f"encode({text!r}, add_special_tokens=False)"
        plain = tok.decode(ids[:-2])
        assert plain == decoded, (f"decode of {text!r}: ours {plain!r}, "
                                  f"the reference's sentencepiece-level decode {decoded!r}")
