"""Batched generation with a preallocated KV cache: left padding, one prefill, then one token per step.

Sampling draws one uniform number per sequence per step from that sequence's own generator
(seeded by `seeds[i]`), so a sample's answer does not depend on which batch or rank it ran in.
Prefill and the decode step are separate functions (gpt-fast): the decode step has one shape at every
position of a generation, so `torch.compile` captures it once per batch and cache size (CUDA graphs on
CUDA; sizes that change between calls become dynamic at the first recompile). Sampling stays eager,
outside the compiled step, because per-sequence torch.Generators cannot be captured.
"""
import functools

import torch


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` of a run with `seed`."""
    return seed * 1_000_003 + index


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> ids (B, T) long and mask (B, T) bool (False = pad), pads on the left so
    that every prompt ends in the last column, where generation continues."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = True
    return ids, mask


def prefill(model, ids, mask, cache):
    """ids, mask (B, T), left-padded prompts -> float32 logits (B, V) at the last position; fills the cache."""
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[:, -1] = True
    return model(ids, mask, cache, logits_at=last).float()


def decode_step(model, token, cache):
    """token (B, 1) -> float32 logits (B, V) of the next position. Static shapes, no host sync: compilable."""
    return model(token, None, cache)[:, -1].float()


@functools.cache
def compiled_decode_step(device_type: str):
    # CUDA: "reduce-overhead" replays the whole step as one CUDA graph (eager decoding is launch-bound).
    # fullgraph: a graph break would mean a Python value crept into the step.
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None, fullgraph=True)


def sample_next(logits, do_sample: bool, top_p: float, temperature: float, generators):
    """logits (B, V) float32 -> next ids (B,). Temperature, then nucleus filtering as the study's sampler."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    # keep the smallest set whose mass reaches top_p (the top token always stays)
    keep = (cum - sorted_p) < top_p
    sorted_p = sorted_p * keep
    cum = sorted_p.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)  # (B,)
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp(max=cum.shape[1] - 1)  # (B, 1)
    return order.gather(1, pick).squeeze(1)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int = 256, max_length: int | None = None,
                 do_sample: bool = False, top_p: float = 0.7, temperature: float = 0.95, seeds=None,
                 compiled: bool = False, suppress_ids: list[int] | None = None, on_token=None):
    """Token-id prompts (each ending [gMASK] <sop>) -> generated ids per prompt, in input order.

    A sequence ends at <eop> (kept as its last id) or after `max_new_tokens`, or when prompt +
    answer reach `max_length`. The batch stops as soon as every sequence has ended.
    `compiled`: run the decode step through torch.compile (same tokens; faster where launches dominate).
    `suppress_ids`: ids never generated (their logits are -inf before sampling or argmax); None: no change.
    `on_token(step, next_ids)`: called after each step with that step's ids (B,) (those of sequences that
    already ended mean nothing), e.g. to stream an answer; None: nothing is called.
    """
    cfg = model.config
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    # each sequence may add up to its own cap: max_new_tokens, and max_length counting its own prompt
    caps = [max_new_tokens if max_length is None else max(0, min(max_new_tokens, max_length - len(p))) for p in prompts]
    new = max(caps)
    ids, mask = (t.to(device) for t in left_pad(prompts, cfg.pad_token_id))
    limit = torch.tensor(caps, device=device)  # (B,)
    seeds = list(range(B)) if seeds is None else seeds
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cache = model.new_cache(B, T + new)
    suppress = None if suppress_ids is None else torch.tensor(suppress_ids, dtype=torch.long, device=device)
    step_fn = compiled_decode_step(device.type) if compiled else decode_step

    out = torch.full((B, new), cfg.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = limit <= 0
    logits = prefill(model, ids, mask, cache)  # (B, V)
    for step in range(new):
        if suppress is not None:  # out of place: never write into the step's output (a CUDA graph's buffer)
            logits = logits.index_fill(1, suppress, float("-inf"))
        nxt = sample_next(logits, do_sample, top_p, temperature, generators)  # (B,)
        out[:, step] = nxt
        lengths += (~done).long()
        done = done | (nxt == cfg.eos_token_id) | (step + 1 >= limit)
        if on_token is not None:
            on_token(step, nxt)
        if bool(done.all()):
            break
        logits = step_fn(model, nxt[:, None], cache)  # (B, V)
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]

