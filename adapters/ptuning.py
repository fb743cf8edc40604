"""P-Tuning v2: trained key/value prefixes for every layer, from a small PrefixEncoder.

The encoder goes into the model's one adapter slot, `model.transformer.prefix_encoder`; the
model views its output (B, P, 2*L*H) as (B, P, 2L, n, d) and gives layer l slot 2l as keys and
2l+1 as values (see model/chatglm.py). Parameter names and default inits are the reference's
(`transformer.prefix_encoder.embedding.weight`, `...trans.0.*`, `...trans.2.*`; torch defaults:
Embedding N(0, 1), Linear kaiming-uniform), so its P-Tuning weights load as they are.
It cannot be merged: the prefix keys/values are extra inputs of every layer, not a change of any weight.
"""
import dataclasses

import torch
import torch.nn as nn

from runtime.flags import COUNT

TITLE = "P-Tuning v2"
HELP = "P-Tuning v2 prefixes"
SETTINGS = ("pre_seq_len", "prefix_projection")


def add_args(group):
    group.add_argument("--pre-seq-len", type=COUNT, help="P-Tuning v2 prefix length (default: 16)")
    group.add_argument("--prefix-projection", action="store_true",
                       help="P-Tuning v2: encode the prefix with a 2-layer MLP")


def settings(args, num_layers: int) -> dict:
    return {"pre_seq_len": args.pre_seq_len, "prefix_projection": args.prefix_projection}


class PrefixEncoder(nn.Module):
    """Without projection: Embedding(P, 2LH). With projection: Embedding(P, H) -> Linear(H, H) -> Tanh ->
    Linear(H, 2LH). forward(B) -> (B, P, 2LH) float32, with dropout 0.1 in train mode."""

    def __init__(self, pre_seq_len: int, num_layers: int, hidden_size: int, projection: bool = False):
        super().__init__()
        if pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be >= 1, got {pre_seq_len}")
        self.pre_seq_len, self.projection = pre_seq_len, projection
        width = 2 * num_layers * hidden_size
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, hidden_size)
            self.trans = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(),
                                       nn.Linear(hidden_size, width))
        else:
            self.embedding = nn.Embedding(pre_seq_len, width)
        # the reference applies Dropout(0.1) to the prefix keys/values; it holds no weights
        self.dropout = nn.Dropout(0.1)

    def forward(self, batch_size: int):
        kv = self.embedding.weight  # (P, H) or (P, 2LH)
        if self.projection:
            kv = self.trans(kv)  # (P, 2LH)
        # expanded before dropout: each sequence of the batch gets its own dropout mask, as in the reference
        return self.dropout(kv.expand(batch_size, *kv.shape))  # (B, P, 2LH)


def apply_ptuning(model: nn.Module, pre_seq_len: int, projection: bool) -> PrefixEncoder:
    """Attach a new PrefixEncoder (float32, on the model's device) and record it in the config.

    The config is replaced by an updated copy, so a config object shared with other models stays as it was.
    """
    if model.transformer.prefix_encoder is not None:
        raise ValueError("the model already has a prefix encoder; apply an adapter to a base model only once")
    cfg = model.config
    with torch.device(model.lm_head.weight.device):
        encoder = PrefixEncoder(pre_seq_len, cfg.num_layers, cfg.hidden_size, projection).float()
    encoder.train(model.training)  # a new module starts in train mode; follow the model's mode
    model.transformer.prefix_encoder = encoder
    model.config = model.transformer.config = dataclasses.replace(cfg, pre_seq_len=pre_seq_len,
                                                                  prefix_projection=projection)
    return encoder


def apply(model: nn.Module, spec):
    apply_ptuning(model, spec.pre_seq_len, spec.prefix_projection)


def to_files(config, spec, tensors: dict) -> tuple[dict, dict]:
    return tensors, {}  # the reference's key names (transformer.prefix_encoder.*); no other file


merge = None  # see the top: nothing to fold into the weights
