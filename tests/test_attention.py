"""The attention seam and compiled decoding: FlexAttention equals SDPA in every case the model runs
(padding, P-Tuning prefix, KV cache, gradients), and the compiled decode step gives the eager tokens."""
import pytest
import torch

from adapters.ptuning import apply_ptuning
from conftest import GMASK, PAD, SOP, small_config, small_model
from model.generate import decode_step, generate_ids, left_pad, prefill
from model.loader import load_model

# Uncompiled FlexAttention runs its unfused reference implementation (and says so once).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TIED = small_config(tie_word_embeddings=True)  # ChatGLMConfig's default


def tied_model(prefix: int = 0):
    """conftest's small model with one output matrix, and `prefix` P-Tuning tokens of random values."""
    model = small_model(TIED, std=0.1)
    if prefix:
        apply_ptuning(model, prefix, projection=False)
        g = torch.Generator().manual_seed(1)
        torch.nn.init.normal_(model.transformer.prefix_encoder.embedding.weight, std=0.5, generator=g)
    return model


SEQS = [[10, 11, 12, 13, 14, GMASK, SOP, 30, 31], [40, GMASK, SOP, 50, 51, 52], [60, 61, 62, GMASK, SOP]]


def with_kernel(model, kernel, *args, **kwargs):
    model.transformer.attention = kernel
    try:
        return model(*args, **kwargs)
    finally:
        model.transformer.attention = "sdpa"


@pytest.mark.parametrize("case", ["single", "left-padded", "prefix"])
@torch.no_grad()
def test_flex_forward_equals_sdpa(case):
    model = tied_model(prefix=3 if case == "prefix" else 0)
    ids, mask = left_pad(SEQS[:1] if case == "single" else SEQS, PAD)
    sdpa = model(ids, mask)
    flex = with_kernel(model, "flex", ids, mask)
    assert (flex - sdpa).abs().max() < 1e-5  # measured: 9.5e-7
    assert model.transformer.attention == "sdpa"


def test_unknown_attention_kernel_is_an_error():
    model = tied_model()
    model.transformer.attention = "flash"
    with pytest.raises(ValueError, match=r"unknown attention kernel 'flash'; use one of \('sdpa', 'flex'\)"):
        model(torch.tensor([SEQS[2]]))


@pytest.mark.parametrize("prefix", [0, 3])
@torch.no_grad()
def test_flex_cached_decode_equals_sdpa_and_recomputation(prefix):
    model = tied_model(prefix)
    ids, mask = left_pad(SEQS, PAD)
    answer = torch.tensor([[70, 71, 72, 73], [80, 81, 82, 83], [90, 91, 92, 93]])
    full = model(torch.cat([ids, answer], 1), torch.cat([mask, torch.ones_like(answer, dtype=torch.bool)], 1))
    T = ids.shape[1]
    for kernel in ("sdpa", "flex"):
        model.transformer.attention = kernel
        cache = model.new_cache(3, T + 4)
        steps = [prefill(model, ids, mask, cache)]
        for t in range(3):
            steps.append(decode_step(model, answer[:, t:t + 1], cache))
        model.transformer.attention = "sdpa"
        for t, logits in enumerate(steps):
            assert (logits - full[:, T - 1 + t]).abs().max() < 1e-5, (kernel, t)  # measured: 8.3e-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU (torch 2.13)")
def test_flex_training_gradients_equal_sdpa():
    model = tied_model(prefix=3).cuda().train()
    model.transformer.prefix_encoder.dropout.p = 0.0  # the same prefix for both kernels
    ids, mask = (t.cuda() for t in left_pad(SEQS, PAD))
    grads = {}
    for kernel in ("sdpa", "flex"):
        model.zero_grad()
        with_kernel(model, kernel, ids, mask).float().square().mean().backward()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["flex"].keys() and len(grads["sdpa"]) > 0
    for name, g in grads["sdpa"].items():
        assert (grads["flex"][name] - g).abs().max() < 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_compiled_decoding_gives_eager_tokens(kernel):
    """Tiny preset + P-Tuning prefix, left-padded batch, greedy and seeded sampling: one compile per kernel."""
    model = load_model("tiny").eval()
    apply_ptuning(model, 4, projection=False)
    model.transformer.attention = kernel
    prompts = [[100 + i for i in range(9)] + [5, 8], [40, 5, 8], [60, 61, 62, 5, 8]]  # [gMASK] 5, <sop> 8
    for sampling in (dict(), dict(do_sample=True, top_p=0.9, temperature=1.0, seeds=[11, 12, 13])):
        eager = generate_ids(model, prompts, max_new_tokens=8, **sampling)
        compiled = generate_ids(model, prompts, max_new_tokens=8, compiled=True, **sampling)
        assert compiled == eager and all(len(r) == 8 for r in eager)
