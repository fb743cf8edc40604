"""How much memory one process holds at the peak of a training step: `train.py --dry-run` prints it for a
meta-device model, so that a user sees whether a run fits before a weight is loaded (WORLD_SIZE=8 --dist fsdp:
full fine-tuning of the 6B on 8 x A100-40GB). An estimate: counted from the model's own tensors and the
activations autograd keeps, nothing measured."""
import torch

from .chatglm import ChatGLMModel
from .loss import CHUNK_ELEMENTS
from .quant import tensor_bytes


def memory_per_step(model: ChatGLMModel, compute_dtype: torch.dtype, shards: int, grad_checkpointing: bool,
                    lowest: int, batch_size: int, source_len: int, target_len: int) -> dict[str, int]:
    """Bytes per process, for a meta-device model as train.py's build_model leaves it (trainable tensors float32,
    frozen ones in the compute dtype or quantized), FSDP2 over `shards` processes (1: DDP or one process), backward
    running through the blocks from `lowest` up.

    parameters: every tensor in its dtype, divided by the shards. FSDP2 also all-gathers for compute, in the compute
        dtype: the root unit (embeddings, final norm, output layer) stays gathered through the step, a block only
        while it runs, the next one prefetched: root + 2 blocks.
    gradients: float32 like the trainable tensors, sharded like them (FSDP2 reduce-scatters in float32).
    optimizer: AdamW's two float32 moments per trainable value, sharded like them.
    activations, what autograd keeps for backward, per token of a batch of source + target tokens, in the compute
        dtype: each block backward runs through keeps the inputs of its two norms (2 h), of QKV (h), q, k, v (3 h),
        the attention's output (h: SDPA's fused kernels keep no T x T scores), the input of h->4h (h), GELU's input
        and output (2 ffn): 8 h + 2 ffn values. Gradient checkpointing keeps only each block's input (h), plus one
        block's full set while it is recomputed. The fused loss (model/loss.py) keeps the (label tokens, h)
        gradient of the hidden states, one chunk of logits (float32 and the compute dtype), and for a trained
        output layer its (V, h) float32 gradient, whole even under FSDP2 (it is the gathered weight's). Not
        counted: the CUDA context, allocator fragmentation, DDP's gradient buckets, the gathered gradients of one
        unit.
    """
    compute = compute_dtype.itemsize
    c = model.config
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gathered = 0
    if shards > 1:
        blocks = model.transformer.layers
        root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in blocks.parameters())
        gathered = (root + 2 * max(sum(p.numel() for p in b.parameters()) for b in blocks)) * compute
    tokens, labelled = batch_size * (source_len + target_len), batch_size * target_len
    layers = c.num_layers - lowest
    per_block = 8 * c.hidden_size + 2 * c.inner_hidden_size
    kept = (layers * c.hidden_size + per_block) if grad_checkpointing else layers * per_block
    loss = labelled * c.hidden_size * compute + CHUNK_ELEMENTS * (4 + compute)
    loss += model.lm_head.weight.numel() * 4 if model.lm_head.weight.requires_grad else 0
    return {"parameters": tensor_bytes(model) // shards + gathered, "gradients": n_trainable * 4 // shards,
            "optimizer": 2 * n_trainable * 4 // shards, "activations": tokens * kept * compute + loss}
