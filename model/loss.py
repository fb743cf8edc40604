"""The training loss: output layer and cross-entropy fused, a chunk of rows at a time; and its label conventions,
which no other module re-derives: a label IGNORE takes no part, and position t predicts label t + 1.

With the released vocabulary (V = 130528) the (N, V) logits of a batch dwarf everything else a LoRA
step holds: 1 GB in float32 at 2000 label tokens, and autograd would keep them (or their log-softmax)
until backward and then allocate a gradient of the same size. Here each chunk of rows computes its
logits, its loss and, right away, its gradients (softmax - onehot times W for the hidden states; and
for a trainable W, its (V, H) gradient, accumulated over chunks). Only the (N, H) gradient (and W's)
lives until backward. Recomputing the logits in backward instead would cost one more lm_head pass.
"""
import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position the loss leaves out: the prompt, padding
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in float32, 128 rows of the released vocabulary


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels (..., T) -> the id each position must predict (..., T): label t + 1, IGNORE at the last position."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE)


def n_targets(labels) -> int:
    """How many tokens of a sample's labels (T,) or a batch's (B, T), a list or a tensor, the loss counts."""
    return int((next_token_targets(torch.as_tensor(labels)) != IGNORE).sum())


def token_loss_sum(model, batch: dict, device) -> torch.Tensor:
    """Sum of float32 natural-log cross-entropies of every label token of `batch` (input_ids, attention_mask,
    labels: (B, T)). Position t predicts label t+1; positions whose next label is IGNORE take no part.
    `model` is a ChatGLMModel or its DDP / FSDP2 wrapper: the loss is computed inside its forward."""
    targets = next_token_targets(batch["labels"].to(device))  # (B, T)
    return model(batch["input_ids"].to(device), batch["attention_mask"].to(device), targets=targets)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over positions with a target of cross_entropy(h @ weight.T, target), float32, natural log.

    h (..., H) hidden states, weight (V, H) the output matrix, targets (...) ids or IGNORE. Never holds
    more than a chunk of the (N, V) logits; under autocast the matmuls run in its dtype, like nn.Linear's.
    """
    at = targets != IGNORE
    h, targets = h[at], targets[at]  # (N, H), (N,)
    if not torch.is_grad_enabled():  # e.g. a validation loss: no gradient to prepare
        h, weight = h.detach(), weight.detach()
    return LinearCrossEntropy.apply(h, weight, targets)


class LinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients in one pass over chunks of rows; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        # h (N, H), weight (V, H), targets (N,)
        need_h, need_w = ctx.needs_input_grad[:2]
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H), summed over chunks
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start:start + rows], targets[start:start + rows]  # (c, H), (c,)
            logits = hc @ weight.T  # (c, V), in autocast's dtype if on
            z = logits.float()
            lse = z.logsumexp(dim=-1)  # (c,)
            loss += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
            if not (need_h or need_w):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, float32, in place of z (z is logits in float32)
            g[torch.arange(len(tc), device=g.device), tc] -= 1.0  # d loss / d logits = softmax - onehot
            g = g.to(logits.dtype)  # the matmuls below run in the logits' dtype, as nn.Linear's backward does
            del logits, z
            if need_h:
                grad_h[start:start + rows] = g @ weight  # (c, H)
            if need_w:
                grad_w += g.T @ hc  # (V, H)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:  # scaled in place: the step's graph is freed after this one backward
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None
