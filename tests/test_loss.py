"""The fused output layer + loss (model.loss) against logits + F.cross_entropy: loss and every gradient, by chunks."""
import pytest
import torch
import torch.nn.functional as F

import model.loss
from adapters import AdapterSpec, apply_adapter
from conftest import EOP, GMASK, SMALL, SOP, small_config, small_model
from model.loss import IGNORE, linear_cross_entropy, token_loss_sum

V = SMALL.vocab_size


@pytest.fixture(autouse=True)
def seven_rows_per_chunk(monkeypatch):
    # 14 label tokens below: chunks of 5, 5, 4 rows, so the chunk boundaries are exercised
    monkeypatch.setattr(model.loss, "CHUNK_ELEMENTS", 5 * V)


def batch() -> dict:
    """Two right-padded training samples, labels IGNORE up to [gMASK] as in data.encode_train."""
    rows = [[10, 11, 12, GMASK, SOP, 20, 21, 22, 23, EOP], [30, 31, GMASK, SOP, 40, 41, 42, 43, 44, 45, EOP, 3]]
    T = 12
    ids = torch.full((2, T), 3)
    mask = torch.zeros(2, T, dtype=torch.long)
    labels = torch.full((2, T), IGNORE)
    for i, r in enumerate(rows):
        n = len(r) - (r[-1] == 3)
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :n] = 1
        sop = r.index(SOP)
        labels[i, sop:n] = ids[i, sop:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(m, b) -> torch.Tensor:
    """What train.py computed before: logits at the positions whose next label counts, float32 cross-entropy sum."""
    follows = b["labels"][:, 1:] != IGNORE
    logits = m(b["input_ids"], b["attention_mask"], logits_at=F.pad(follows, (0, 1)))  # (N, V)
    return F.cross_entropy(logits.float(), b["labels"][:, 1:][follows], reduction="sum")


def grads(m, loss_fn, b) -> tuple[float, dict]:
    m.zero_grad(set_to_none=True)
    loss = loss_fn(m, b)
    (loss * 0.37).backward()  # a scale, as train.py's 1 / label tokens
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def lora_model(tied: bool):
    torch.manual_seed(0)
    m = small_model(small_config(tie_word_embeddings=tied))
    apply_adapter(m, AdapterSpec("lora", layers=[1, 2], lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would make A's gradient 0: give B values
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return m.train()


def full_model(tied: bool):
    m = small_model(small_config(tie_word_embeddings=tied))
    apply_adapter(m, AdapterSpec("full"))
    return m.train()


@pytest.mark.parametrize("make, tied", [(lora_model, True), (lora_model, False), (full_model, True),
                                        (full_model, False)])
def test_fused_loss_and_gradients_equal_logits_then_cross_entropy(make, tied):
    m = make(tied)
    b = batch()
    loss, fused = grads(m, lambda m, b: token_loss_sum(m, b, "cpu"), b)
    ref_loss, ref = grads(m, reference_loss, b)
    assert (b["labels"][:, 1:] != IGNORE).sum() == 14
    assert loss == pytest.approx(ref_loss, rel=1e-6) and loss > 14 * 1.0
    assert max_diff(fused, ref) < 1e-5  # measured ~1e-7
    if make is full_model:
        head = "transformer.word_embeddings.weight" if tied else "lm_head.weight"
        assert head in fused and fused[head].abs().max() > 1e-3
        assert ("lm_head.weight" in fused) == (not tied)  # tied: one matrix, the gradient of both uses summed
    else:
        assert len(fused) == 4 and all("lora_" in n for n in fused)  # A and B of 2 layers


def test_hidden_state_gradient_and_no_full_logits_kept():
    """Direct: grad of h and of W against F.linear + F.cross_entropy; and autograd keeps nothing of size (N, V)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, 64, generator=g).requires_grad_()
    w = (0.3 * torch.randn(V, 64, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (2, 9), generator=g)
    targets[0, :3] = IGNORE
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = linear_cross_entropy(h, w, targets)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    at = targets != IGNORE
    ref = F.cross_entropy(F.linear(h[at], w), targets[at], reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert (gh - h.grad).abs().max() < 1e-5 and (gw - w.grad).abs().max() < 1e-5
    assert (gh[0, :3] == 0).all()
    assert sorted(saved) == [(2, 9), (15, 64), (V, 64)]  # the mask of h[at], the (N, H) and (V, H) gradients


@pytest.mark.parametrize("make", [lora_model, full_model])
def test_bf16_autocast_as_accurate_as_logits_then_cross_entropy(make):
    """Under bf16 autocast both ways differ from float32 by bf16 rounding (measured: 7-11% of the largest
    gradient entry, both ways); the fused way must not be worse, and is within 2% of the old way's numbers."""
    m = make(True)
    b = batch()
    _, exact = grads(m, reference_loss, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, fused = grads(m, lambda m, b: token_loss_sum(m, b, "cpu"), b)
        ref_loss, ref = grads(m, reference_loss, b)

    def error(g):
        return max(((g[k] - exact[k]).abs().max() / exact[k].abs().max()).item() for k in exact)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert error(fused) < 1.1 * error(ref)
    assert max(((fused[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref) < 0.03


def test_no_label_and_no_grad():
    m = full_model(True)
    b = batch()
    b["labels"][:] = IGNORE
    loss = token_loss_sum(m, b, "cpu")
    loss.backward()
    assert loss.item() == 0.0 and m.transformer.word_embeddings.weight.grad.abs().max() == 0
    b = batch()
    with torch.no_grad():
        loss = token_loss_sum(m, b, "cpu")
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(reference_loss(m, b).item(), rel=1e-6)
