"""Padding and the order of samples.

Batches are planned GLOBALLY (all ranks together) from (seed, epoch) alone, and each rank takes a strided share.
A DDP run with per-rank batch b on W ranks uses global_batch_size = b * W; a single process with batch b * W then
sees exactly the same global batches, which is what makes DDP == single-process testable.
"""
import random

import torch

from model.loss import IGNORE


def collate_train(samples: list[dict], pad_id: int) -> dict:
    """Right padding: pads come after <eop>, get attention 0 and label -100. -> (B, T) long tensors."""
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def global_batches(lengths: list[int], global_batch_size: int, seed: int, epoch: int,
                   group_by_length: bool = True, mega_batches: int = 50) -> list[list[int]]:
    """One epoch's batches of sample indices; every index exactly once, the same for any world size.

    Without grouping: a seeded permutation cut into batches. With grouping: the permutation is cut into mega-chunks
    of `mega_batches` batches, each sorted by length (longest first) so a batch holds similar lengths and padding
    stays small, and then the order of the full batches is shuffled. The one short batch (when the sample count
    is not a multiple of global_batch_size) always comes last.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    rng = random.Random(f"{seed}/{epoch}")  # str seeds are hashed deterministically (not PYTHONHASHSEED-dependent)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        chunk = global_batch_size * mega_batches
        order = [i for k in range(0, len(order), chunk)
                 for i in sorted(order[k:k + chunk], key=lambda i: -lengths[i])]
    batches = [order[k:k + global_batch_size] for k in range(0, len(order), global_batch_size)]
    if not group_by_length:
        return batches
    tail = [batches.pop()] if batches and len(batches[-1]) < global_batch_size else []
    rng.shuffle(batches)
    return batches + tail


def rank_share(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global batch: disjoint across ranks, together the whole batch. Striding a
    length-sorted batch gives every rank similar lengths. In a short last batch a rank's share may be smaller
    (or empty when the batch has fewer samples than ranks)."""
    return batch[rank::world_size]
