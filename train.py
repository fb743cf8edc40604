"""Fine-tune ChatGLM-6B with Freeze, P-Tuning v2, LoRA or all weights; one process or torchrun (DDP / FSDP2).

    python train.py --model tiny --method lora --target qkv --layers 3 --max-steps 20 --output-dir runs/demo
    torchrun --nproc_per_node 8 train.py --model /path/to/chatglm-6b --method lora --target qkv --layers 3 \\
        --dataset roleplay_all_train --dataset-dir ../shared/data --output-dir runs/lora-qkv

One optimizer step: --grad-accum micro-batches of --batch-size x world samples. Every rank builds the
same samples and the same global batches (data.global_batches depends on seed and epoch, not on the
world size) and takes its share. Logits are computed only where a label follows; the step's loss is
the sum of float32 token cross-entropies over the number of label tokens of the whole global step, so
2 ranks x 2 samples give the gradient of 1 process x 4 samples.

Validation (--val-size held-out records, --eval-dataset sets) runs every --eval-steps steps in eval mode and
without grad: it draws no random number and touches no gradient, so the training is the same with it or without.

Read top to bottom: the settings and their flags, the samples and their order, the model and its adapter,
distributed wrapping and the optimizer, one optimizer step (forward_backward, optimizer_step), validation,
the safety nets, and the loop (train). The run directory, the loop's Progress and its checkpoints are
study/training.py.
"""
import argparse
import functools
import gc
import importlib.util
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from adapters import (AdapterSpec, add_adapter_args, apply_adapter, base_weights, float32_trainable, load_weights,
                      read_adapter, trainable_report)
from data import (DataSettings, add_data_args, collate_train, encode_records, format_report, global_batches, hold_out,
                  load_records, rank_share)
from model.chatglm import ATTENTION_KERNELS, ChatGLMModel
from model.loader import load_config, load_model
from model.loss import n_targets, token_loss_sum
from model.memory import memory_per_step
from model.quant import MODES as QUANT_MODES, base_weight_bytes, quantize_model
from model.tokenizer import load_tokenizer
from runtime.files import digest, explain, write_json
from runtime.flags import COUNT, COUNT_OR_ZERO, NON_NEGATIVE, POSITIVE, from_flags
from runtime.precision import DTYPES, add_precision_arg, precision
from runtime.process import all_gather, init_distributed, peak_memory_bytes, say_once
from study import training
from study.fingerprint import code_fingerprint, data_fingerprint
from study.grid import DEMO_SETTINGS, MODEL_HELP, resolve_model
from study.rundir import LOG, LOSS_PLOT, TRAIN_RESULTS

OOM_HELP = ("out of memory. Knobs, cheapest first: a smaller --batch-size with a larger --grad-accum (same global "
            "batch), --grad-checkpointing, shorter --max-source-length / --max-target-length, --precision bf16, "
            "--dist fsdp (shards trainable weights, gradients and optimizer state)")


# ---------------------------------------------------------------- the settings, read once

@dataclass(frozen=True)
class Optimization:
    """How the weights move; the defaults are the study's settings."""
    lr: float = 1e-5
    epochs: int = 10
    max_steps: int = 0  # 0: --epochs over the data
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 42


@dataclass(frozen=True)
class Execution:
    """How the steps run: numbers, memory and speed."""
    precision: str  # resolved: bf16 on CUDA, fp32 on a CPU unless given
    quantize: str = "none"
    dist: str = "ddp"
    dist_timeout: float = 30.0
    grad_checkpointing: bool = False
    compile: bool = False
    attention: str = "sdpa"


@dataclass(frozen=True)
class Validation:
    val_size: int = 0
    eval_dataset: str | None = None
    eval_steps: int = 100


@dataclass(frozen=True)
class Outputs:
    output_dir: str = "outputs/train"
    save_steps: int = 500  # 0: at the end only
    save_minutes: float = 0.0  # 0: off
    logging_steps: int = 10
    plot_loss: bool = False
    tensorboard: bool = False
    resume: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything a training run is given, typed; `flags` is every flag as parsed (run_config.json records it,
    study/training.py recognises a run by it)."""
    model: str
    adapter: AdapterSpec
    data: DataSettings
    val: Validation
    optim: Optimization
    run: Execution
    out: Outputs
    dry_run: bool
    flags: dict


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help names every default: appended where an option's help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help=MODEL_HELP + "; without --model and $MODEL the demo's settings are the defaults: "
                   + DEMO_SETTINGS)
    add_adapter_args(p)
    add_data_args(p)
    add_validation_args(p)
    add_optimization_args(p)
    add_execution_args(p)
    add_output_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device, apply the adapter, print the trainable parameters and an "
                        "estimate of the memory per process (for WORLD_SIZE processes: WORLD_SIZE=8 --dist fsdp "
                        "sizes 8 GPUs), exit")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    model, note = resolve_model(args.model)
    if args.model is None and not os.environ.get("MODEL"):
        # the demo's model learns in minutes only with the demo's settings; flags given (after them) still win
        args = p.parse_args(DEMO_SETTINGS.split() + argv)
        note += f"; the demo's settings: {DEMO_SETTINGS}"
    args.model = model
    if note:
        say_once(note)
    args.precision = precision(args.precision)
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:  # one line, before any work
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return Settings(model=args.model, adapter=AdapterSpec.from_args(args, load_config(args.model).num_layers),
                    data=from_flags(DataSettings, args), val=from_flags(Validation, args),
                    optim=from_flags(Optimization, args), run=from_flags(Execution, args),
                    out=from_flags(Outputs, args), dry_run=args.dry_run, flags=vars(args))


def add_validation_args(p):
    v = Validation
    g = p.add_argument_group("validation (a loss on samples the run does not train on)")
    g.add_argument("--val-size", type=COUNT_OR_ZERO, default=v.val_size,
                   help="hold out N records of --dataset, chosen by --seed, for validation; 0: none")
    g.add_argument("--eval-dataset", default=v.eval_dataset,
                   help="comma-separated datasets in --dataset-dir to validate on as well (their first "
                        "--max-samples records each, encoded like the training samples)")
    g.add_argument("--eval-steps", type=COUNT, default=v.eval_steps,
                   help="the validation loss every N optimizer steps and after the last (with --val-size or "
                        "--eval-dataset)")


def add_optimization_args(p):
    o = Optimization
    g = p.add_argument_group("optimisation (defaults: the study's settings)")
    g.add_argument("--lr", type=POSITIVE, default=o.lr, help="peak learning rate of AdamW (betas 0.9, 0.999, eps 1e-8)")
    g.add_argument("--epochs", type=COUNT, default=o.epochs, help="passes over the training samples")
    g.add_argument("--max-steps", type=COUNT_OR_ZERO, default=o.max_steps,
                   help="optimizer steps; 0: --epochs over the data")
    g.add_argument("--batch-size", type=COUNT, default=o.batch_size, help="samples per device per micro-batch")
    g.add_argument("--grad-accum", type=COUNT, default=o.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--scheduler", choices=["cosine", "linear", "constant"], default=o.scheduler,
                   help="learning-rate decay to 0 after the warmup (constant: none)")
    g.add_argument("--warmup-steps", type=COUNT_OR_ZERO, default=o.warmup_steps, help="linear warmup from 0 to --lr")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=o.weight_decay,
                   help="on matrices only (not biases or norms)")
    g.add_argument("--max-grad-norm", type=NON_NEGATIVE, default=o.max_grad_norm,
                   help="clip the global gradient norm; 0: no clipping")
    g.add_argument("--seed", type=int, default=o.seed, help="adapter init, batch order, dropout")


def add_execution_args(p):
    e = Execution
    g = p.add_argument_group("speed and memory")
    add_precision_arg(g, "frozen weights are stored in this dtype and compute runs under autocast to it; trainable "
                         "weights and the optimizer stay float32; fp16 adds loss scaling")
    g.add_argument("--quantize", choices=QUANT_MODES, default=e.quantize,
                   help="store the frozen Linear weights of the blocks quantized (model/quant.py): int8 per output "
                        "channel, int4 in groups of 128; embeddings, norms, the output layer and trained weights "
                        "stay as they are (lora, ptuning, freeze; not full; with --dist ddp)")
    g.add_argument("--dist", choices=["ddp", "fsdp"], default=e.dist,
                   help="with several processes: DDP replicates the model; FSDP2 shards it (for --method full)")
    g.add_argument("--dist-timeout", type=POSITIVE, default=e.dist_timeout,
                   help="minutes a collective may wait for a hung rank")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute trainable blocks in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block (on a GPU: +20%% tokens/s)")
    g.add_argument("--attention", choices=ATTENTION_KERNELS, default=e.attention,
                   help="attention kernel (FlexAttention trains on a GPU only)")


def add_output_args(p):
    o = Outputs
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default=o.output_dir, help="the run directory (adapter, logs, checkpoints)")
    g.add_argument("--save-steps", type=COUNT_OR_ZERO, default=o.save_steps,
                   help="checkpoint every N steps (and at the end); 0: end only")
    g.add_argument("--save-minutes", type=NON_NEGATIVE, default=o.save_minutes,
                   help="also checkpoint when this many minutes of training passed since the last checkpoint; 0: off")
    g.add_argument("--logging-steps", type=COUNT, default=o.logging_steps,
                   help="a trainer_log.jsonl line every N steps")
    g.add_argument("--plot-loss", action="store_true", help="write training_loss.png")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write trainer_log.jsonl's numbers as TensorBoard event files into the run directory "
                        "(needs the tensorboard package: pip install tensorboard)")
    g.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint, if any")
    g.add_argument("--overwrite", action="store_true", help="replace a different run in --output-dir")


# ---------------------------------------------------------------- the samples and their order

class TrainData:
    """Every rank holds all samples and plans the same global batches (data.global_batches depends on seed
    and epoch only, not on the world size); each takes its share of every micro-batch."""

    def __init__(self, samples: list[dict], pad_id: int, global_batch: int, grad_accum: int, seed: int):
        self.samples, self.pad_id, self.global_batch, self.grad_accum, self.seed = \
            samples, pad_id, global_batch, grad_accum, seed
        self.targets = [n_targets(s["labels"]) for s in samples]  # the tokens the loss counts, per sample
        self.lengths = [len(s["input_ids"]) for s in samples]
        self.steps_per_epoch = math.ceil(math.ceil(len(samples) / global_batch) / grad_accum)
        self.planned = (-1, [])  # (epoch, its global batches): planned once per epoch

    def step_batches(self, step: int, rank: int, world: int) -> tuple[list[tuple[dict, float]], int, int]:
        """This rank's micro-batches of optimizer step `step`, each with the weight of its loss sum;
        -> (them, label tokens of the whole global step, samples of the whole global step)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self.planned[0] != epoch:
            self.planned = (epoch, global_batches(self.lengths, self.global_batch, self.seed, epoch))
        micro = self.planned[1][k * self.grad_accum:(k + 1) * self.grad_accum]
        n_targets = max(1, sum(self.targets[i] for b in micro for i in b))
        batches = []
        for global_ids in micro:
            ids = rank_share(global_ids, rank, world)
            weight = world / n_targets  # DDP and FSDP2 average gradients over ranks; x world undoes it
            if not ids:  # fewer samples than ranks: a zero-weight pass keeps the collectives in step
                ids, weight = global_ids[:1], 0.0
            batches.append((collate_train([self.samples[i] for i in ids], self.pad_id), weight))
        return batches, n_targets, sum(len(b) for b in micro)


def load_samples(data: DataSettings, val: Validation, optim: Optimization, tokenizer,
                 world: int) -> tuple[TrainData, list[dict], dict]:
    """The --dataset records less the --val-size held out, encoded for training; -> the training data, the
    validation samples (the held-out records, then the --eval-dataset records, encoded alike) and the data report."""
    read = functools.partial(load_records, dataset_dir=data.dataset_dir, max_samples=data.max_samples,
                             skip_bad_records=data.skip_bad_records)
    encode = functools.partial(encode_records, tokenizer, max_source_length=data.max_source_length,
                               max_target_length=data.max_target_length, source_prefix=data.source_prefix,
                               expand_history=data.expand_history)
    records, report = read(data.names, seed=optim.seed)
    records, held_out = hold_out(records, val.val_size)
    samples, counts = encode(records)
    if not samples:
        raise ValueError(f"--dataset {data.dataset} in {data.dataset_dir} gave no training samples: its records are "
                         "empty, held out or dropped (see the data report: python -m data --dataset ...)")
    val_samples, _ = encode(held_out + (read(val.eval_dataset.split(","), seed=None)[0] if val.eval_dataset else []))
    if val.eval_dataset and not val_samples:
        raise ValueError(f"--eval-dataset {val.eval_dataset} in {data.dataset_dir} gave no validation samples")
    report.update(counts, held_out=len(held_out), val_samples=len(val_samples))
    train = TrainData(samples, tokenizer.pad_id, optim.batch_size * world, optim.grad_accum, optim.seed)
    return train, val_samples, report


# ---------------------------------------------------------------- the model, its adapter, the loss

def build_model(name: str, spec: AdapterSpec, run: Execution, seed: int, resume_from: Path | None,
                device) -> tuple[ChatGLMModel, dict | None]:
    """The base in --precision with the adapter applied (trainable tensors in float32); on resume, the
    checkpoint's trainable weights. Only the method's tensors require grad. -> (it, the base-weights fingerprint
    its adapter files record: taken before sharding and quantizing)."""
    torch.manual_seed(seed)  # the adapter's random init is the same on every rank
    # Quantizing, the base is loaded on the CPU and goes to the device layer by layer: never whole in float there.
    model = load_model(name, dtype=DTYPES[run.precision], device=device if run.quantize == "none" else "cpu")
    model.transformer.attention = run.attention
    float32_trainable(apply_adapter(model, spec))
    base = base_weights(model)
    quantize_model(model, run.quantize, device)  # the frozen Linears of the blocks; the adapter stays float
    model.to(device)
    if resume_from is not None:  # before sharding: the checkpoint's adapter into the float32 trainable tensors
        load_weights(model, read_adapter(resume_from, model.config)[1])
    model.train()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{spec} leaves no trainable parameter")
    prepare_blocks(model, run.grad_checkpointing, run.compile)
    return model, base


def prepare_blocks(model, grad_checkpointing: bool, compile: bool) -> int:
    """--grad-checkpointing on the blocks backward runs through, --compile on every block (the frozen ones
    below gain as much: their norms, rotary and GELU fuse); -> the lowest block backward runs through."""
    lowest = lowest_trainable_layer(model)
    for i, block in enumerate(model.transformer.layers):
        if grad_checkpointing and i >= lowest:
            block.forward = checkpointed(block.forward)
        if compile:
            block.compile()
    return lowest


def lowest_trainable_layer(model) -> int:
    """Backward stops below this layer by itself: nothing under it requires grad, so autograd records
    no graph there. P-Tuning's prefix enters every layer (0); full training includes the embeddings (0)."""
    t = model.transformer
    if t.prefix_encoder is not None or any(p.requires_grad for p in t.word_embeddings.parameters()):
        return 0
    return next((i for i, block in enumerate(t.layers) if any(p.requires_grad for p in block.parameters())),
                len(t.layers))


def checkpointed(forward):
    """A block forward that keeps only its inputs and recomputes the rest in backward (non-reentrant:
    frozen inputs and RNG, e.g. LoRA dropout, are handled; the recomputation sees the same mask)."""
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def sync_gradients(wrapped, last: bool, fsdp: bool):
    """Gradient accumulation all-reduces only on the last micro-batch of a step."""
    if fsdp:
        wrapped.set_requires_gradient_sync(last)
    elif isinstance(wrapped, DDP) and not last:
        return wrapped.no_sync()
    return nullcontext()


# ---------------------------------------------------------------- distributed wrapping, optimizer, schedule

def shard_fsdp2(model, precision: str):
    """FSDP2 units: each block, and the root (embeddings, final norm, lm_head).

    FSDP2 all-gathers a unit as one flat buffer of one dtype, but a block with an adapter mixes float32
    trainable tensors (the master weights) with the bf16 frozen base. There, every module that directly
    owns trainable tensors (LoRA's A and B, a Freeze-trained Linear) becomes its own unit first, so the
    block's unit keeps only the frozen bf16 rest. The prefix encoder is a unit of its own as well.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision] if precision != "fp32" else None,
                                  reduce_dtype=torch.float32)
    for block in model.transformer.layers:
        if len({p.dtype for p in block.parameters()}) > 1:
            for name, module in block.named_modules():
                own = list(module.parameters(recurse=False))
                if module is block or not any(p.requires_grad for p in own):
                    continue
                if len({p.dtype for p in own}) > 1:
                    raise ValueError(f"FSDP2 cannot shard {name}: its own parameters mix dtypes "
                                     f"{sorted(str(p.dtype) for p in own)}; use --dist ddp or --precision fp32")
                fully_shard(module, mp_policy=policy)
        fully_shard(block, mp_policy=policy)
    if model.transformer.prefix_encoder is not None:
        fully_shard(model.transformer.prefix_encoder, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine/linear decay to 0."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return f


@dataclass
class Trainer:
    """The machinery of a training step, built once by make_trainer: the model and its wrapper, the optimizer and
    schedule, precision, and where the process stands among the ranks."""
    model: ChatGLMModel  # parameter names, saving
    wrapped: torch.nn.Module  # what runs forward: the model (one process, FSDP2 shards it in place) or DDP(model)
    fsdp: bool
    names: list[str]  # the trainable parameters (after sharding: DTensors)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 only
    autocast: torch.autocast
    device: torch.device
    rank: int
    world: int
    base_weights: dict | None = None  # the fingerprint of the frozen base its adapter files record


def make_trainer(model, optim: Optimization, run: Execution, total: int, rank: int, world: int, device,
                 base: dict | None = None) -> Trainer:
    """DDP or FSDP2 with several processes, then AdamW over the trainable tensors (fused on CUDA; weight
    decay on matrices only; betas 0.9, 0.999, eps 1e-8), the --scheduler over `total` steps, fp16 loss scaling."""
    fsdp = world > 1 and run.dist == "fsdp"
    wrapped = model
    if fsdp:
        shard_fsdp2(model, run.precision)
    elif world > 1:  # the only buffers are quantized weights (model/quant.py), equal on every rank: sent once
        quantized = {"broadcast_buffers": False} if any(True for _ in model.buffers()) else {}
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **quantized)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(0.9, 0.999), eps=1e-8,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.scheduler, optim.warmup_steps, total))
    return Trainer(model, wrapped, fsdp, [n for n, _ in named], params, optimizer, scheduler,
                   scaler=torch.amp.GradScaler(device.type, enabled=run.precision == "fp16"),
                   autocast=torch.autocast(device.type, dtype=DTYPES[run.precision], enabled=run.precision != "fp32"),
                   device=device, rank=rank, world=world, base_weights=base)


# ---------------------------------------------------------------- one optimizer step

def forward_backward(trainer: Trainer, micro: list[tuple[dict, float]]) -> tuple[float, float]:
    """The gradient of one optimizer step: every (batch, weight) of this rank, weighted loss sums
    accumulated. -> (token loss sum, input tokens) of the whole global step, all ranks together."""
    trainer.optimizer.zero_grad(set_to_none=True)
    local = torch.zeros(2, device=trainer.device)  # loss sum, input tokens
    for j, (batch, weight) in enumerate(micro):
        with sync_gradients(trainer.wrapped, j == len(micro) - 1, trainer.fsdp):
            with trainer.autocast:
                loss_sum = token_loss_sum(trainer.wrapped, batch, trainer.device)
            trainer.scaler.scale(loss_sum * weight).backward()
        if weight:
            local += torch.stack([loss_sum.detach(), batch["attention_mask"].sum().to(trainer.device, torch.float32)])
    if trainer.world > 1:
        dist.all_reduce(local)
    return local[0].item(), local[1].item()


def optimizer_step(trainer: Trainer, max_grad_norm: float) -> float:
    """Unscale (fp16), clip the global gradient norm (0: no clipping), AdamW, the schedule; -> the norm
    before clipping. The gradients stay until the next forward_backward (the untrained-tensor check reads them)."""
    trainer.scaler.unscale_(trainer.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(trainer.params, max_grad_norm or math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    return norm


# ---------------------------------------------------------------- validation

def validation_batches(samples: list[dict], pad_id: int, batch_size: int, rank: int,
                       world: int) -> list[tuple[dict, bool]]:
    """This rank's share of the validation samples, longest first (little padding) in global batches of
    batch_size x world, each with whether it counts: a rank whose share of a batch is empty runs the batch's
    first sample uncounted, so that every rank runs as many forwards (under FSDP2 each one is a collective)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    batches = []
    for k in range(0, len(order), batch_size * world):
        global_ids = order[k:k + batch_size * world]
        ids = rank_share(global_ids, rank, world)
        batches.append((collate_train([samples[i] for i in ids or global_ids[:1]], pad_id), bool(ids)))
    return batches


def validate(trainer: Trainer, batches: list[tuple[dict, bool]]) -> float:
    """The mean token cross-entropy (natural log) over every label token of the validation samples: eval mode
    (no dropout: no random number is drawn, the training's RNG stream stays as it was), no grad, the training's
    autocast. Every rank sums its share; the sums over all ranks do not depend on the world size (up to float
    rounding)."""
    trainer.model.eval()
    local = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # loss sum, label tokens
    with torch.no_grad(), trainer.autocast:
        for batch, counts in batches:
            # the model, not DDP's wrapper: no collective
            loss_sum = token_loss_sum(trainer.model, batch, trainer.device)
            if counts:
                targets = torch.tensor(n_targets(batch["labels"]), dtype=torch.float64, device=trainer.device)
                local += torch.stack([loss_sum.double(), targets])
    if trainer.fsdp:
        trainer.model.reshard()  # the root's weights stay gathered after a forward without backward
    trainer.model.train()
    if trainer.world > 1:
        dist.all_reduce(local)
    return (local[0] / local[1]).item()


# ---------------------------------------------------------------- safety nets

class UntrainedError(RuntimeError):
    pass


def check_loss(loss: float, step: int, lr: float):
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step} (lr {lr:.3g}); lower --lr or --warmup-steps up, "
                                 "use --precision bf16 rather than fp16, or look for broken samples")


def grad_sums(params: list, fsdp: bool, device) -> torch.Tensor:
    """Sum of |grad| per parameter (-1 where it has none), the same on every rank."""
    sums = torch.stack([torch.tensor(-1.0, device=device) if p.grad is None else
                        (p.grad.to_local() if fsdp else p.grad).detach().float().abs().sum() for p in params])
    if fsdp:  # each rank holds a shard of every gradient; a missing one is missing on every rank
        missing = sums < 0
        dist.all_reduce(sums)
        sums = torch.where(missing, -1.0, sums)
    return sums.cpu()


def untrained_tensors(names: list[str], sums_by_step: list[torch.Tensor], zero_ok: bool = False) -> list[str]:
    """Trainable tensors whose gradient was missing (or all zero) at every checked step.

    Why two steps: LoRA's B starts at zero, so at step 1 the gradient of A (which flows through B)
    is exactly zero by construction; after one optimizer step B is nonzero and so is A's gradient.
    A tensor still without gradient at step 2 is the classic silently untrained adapter: a hook, a
    detach, a module the forward never calls. With a single step only missing gradients count.
    """
    sums = torch.stack(sums_by_step)  # (steps, tensors)
    trained = (sums >= 0 if zero_ok else sums > 0).any(dim=0)
    return [n for n, ok in zip(names, trained.tolist()) if not ok]


def check_trained(trainer: Trainer, sums_by_step: list[torch.Tensor], total: int):
    """Called after steps 1 and 2 with their gradients still in place: stops a run whose adapter does not train."""
    sums_by_step.append(grad_sums(trainer.params, trainer.fsdp, trainer.device))
    if len(sums_by_step) == min(2, total):
        bad = untrained_tensors(trainer.names, sums_by_step, zero_ok=total == 1)
        if bad:
            raise UntrainedError(
                f"{len(bad)} trainable tensor(s) got no gradient in the first {len(sums_by_step)} steps: "
                f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. The adapter is not on the "
                "loss's path (a detach, a hook, a module the forward never calls)")


# ---------------------------------------------------------------- the loop

def train(s: Settings, rank: int, world: int, device: torch.device):
    say = print if rank == 0 else (lambda *a, **k: None)
    check_quantize(s.run, s.adapter, world)

    # Everything that can be wrong with the request fails here, before a weight is loaded.
    out = Path(s.out.output_dir)
    run_config = training.run_config(s.flags, world)
    resume_from = training.check_output_dir(out, run_config, s.out.resume, s.out.overwrite)  # None: from scratch
    if resume_from is not None and (out / TRAIN_RESULTS).is_file():
        say(f"{out}: this run has finished ({TRAIN_RESULTS}); nothing to resume")
        return
    tokenizer = load_tokenizer(s.model)
    data, val_samples, report = load_samples(s.data, s.val, s.optim, tokenizer, world)  # every rank: all samples
    say(format_report(report))
    val = validation_batches(val_samples, tokenizer.pad_id, s.optim.batch_size, rank, world)  # []: no validation
    total = s.optim.max_steps or s.optim.epochs * data.steps_per_epoch

    model, base = build_model(s.model, s.adapter, s.run, s.optim.seed, resume_from, device)  # base + adapter
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = make_trainer(model, s.optim, s.run, total, rank, world, device, base)  # DDP / FSDP2, AdamW, schedule
    progress = begin(s, trainer, {**run_config, "trainable_params": n_trainable}, resume_from, data, total)
    board = training.open_board(out, progress.step) if s.out.tensorboard and rank == 0 else None  # TensorBoard's

    grad_sums_by_step = []  # for the untrained-tensor check after steps 1 and 2
    with tqdm(total=total, initial=progress.step, disable=rank != 0, dynamic_ncols=True,
              desc=s.adapter.method) as bar:
        progress.t0 = progress.saved_at = time.time()  # throughput counts the loop only
        while progress.step < total:
            micro, n_targets, n_samples = data.step_batches(progress.step, rank, world)  # this rank's share
            loss_sum, tokens = forward_backward(trainer, micro)  # accumulated gradients; sums over all ranks
            loss, lr = loss_sum / n_targets, trainer.scheduler.get_last_lr()[0]  # mean token loss, lr of this step
            check_loss(loss, progress.step + 1, lr)
            norm = optimizer_step(trainer, s.optim.max_grad_norm)  # unscale, clip, AdamW, schedule
            if progress.step < 2:
                check_trained(trainer, grad_sums_by_step, total)
            progress.add(loss, tokens, n_samples)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{progress.tokens_per_s():.0f}", refresh=False)
            bar.update(1)
            if rank == 0 and (progress.step % s.out.logging_steps == 0 or progress.step == total):
                log_step(out, progress, lr, norm, data.steps_per_epoch, board)
            if val and (progress.step % s.val.eval_steps == 0 or progress.step == total):  # before the checkpoint
                run_validation(out, trainer, val, progress, data.steps_per_epoch, board)
            if checkpoint_due(s.out, progress, total, trainer):
                training.save_checkpoint(out, trainer, s.adapter, progress, data.steps_per_epoch)  # a collective
                progress.saved_at = time.time()
    finish(s, out, trainer, progress, data.steps_per_epoch, n_trainable)
    if board is not None:
        board.close()


def begin(s: Settings, trainer: Trainer, run_config: dict, resume_from: Path | None, data: TrainData,
          total: int) -> training.Progress:
    """The loop's starting point: the checkpoint's state (optimizer, schedule, scaler, RNG, step, losses) or a
    fresh one; rank 0 starts the run directory and says what is trained how."""
    if resume_from is not None:
        progress = training.resume(resume_from, trainer)
    else:
        progress = training.Progress()
        torch.manual_seed(s.optim.seed + trainer.rank)  # dropout masks differ between ranks
    if trainer.rank == 0:
        training.start_run(Path(s.out.output_dir), run_config, progress.step if resume_from is not None else None)
        print(trainable_report(trainer.model))
        print(f"{len(data.samples)} samples, {data.steps_per_epoch} steps per epoch, {total} steps, global batch "
              f"{data.global_batch * s.optim.grad_accum}, {trainer.world} x {trainer.device.type}, {s.run.precision}"
              + (f", resuming at step {progress.step} from {resume_from}" if resume_from else ""))
    if trainer.world > 1:
        dist.barrier()
    return progress


def checkpoint_due(out: Outputs, progress: training.Progress, total: int, trainer: Trainer) -> bool:
    """Every --save-steps steps, at the last step, and when --save-minutes of training passed since the last
    checkpoint (rank 0's clock decides for every rank: saving is a collective)."""
    if (out.save_steps and progress.step % out.save_steps == 0) or progress.step == total:
        return True
    if not out.save_minutes:
        return False
    due = torch.tensor(float(time.time() - progress.saved_at >= 60 * out.save_minutes), device=trainer.device)
    if trainer.world > 1:
        dist.broadcast(due, src=0)
    return bool(due)


def check_quantize(run: Execution, spec: AdapterSpec, world: int):
    """--quantize needs frozen base weights (not --method full), replicated on every rank (DDP, not FSDP2)."""
    if run.quantize == "none":
        return
    if spec.method == "full":
        raise ValueError(f"--quantize {run.quantize} with --method full: full fine-tuning trains every weight, "
                         "so none is frozen to quantize; drop --quantize, or train lora, ptuning or freeze over "
                         "the quantized base")
    if world > 1 and run.dist == "fsdp":
        raise ValueError(f"--quantize {run.quantize} with --dist fsdp: FSDP2 shards float parameters and the "
                         "quantized weights are buffers; use --dist ddp (the quantized base is replicated)")


def dry_run(name: str, spec: AdapterSpec, run: Execution, batch_size: int, data: DataSettings, world: int, say):
    """The adapter on a meta-device model: the trainable parameter count at any size, without memory; and the
    memory per process a training step of `world` processes would take (WORLD_SIZE=8 sizes an 8-GPU run here)."""
    config = load_config(name)
    with torch.device("meta"):
        model = ChatGLMModel(config)
    apply_adapter(model, spec)
    say(f"{name}: {config.num_layers} layers, hidden {config.hidden_size}; {spec}")
    say(trainable_report(model))
    size = base_weight_bytes(config, DTYPES[run.precision], run.quantize)
    say(f"base weights: {size / 2**30:.2f} GiB ({run.precision}, {run.quantize})")
    model.to(DTYPES[run.precision])  # as build_model leaves it: the base in --precision, the trained tensors float32
    float32_trainable(model)
    quantize_model(model, run.quantize, "meta")
    shards = world if world > 1 and run.dist == "fsdp" else 1
    memory = memory_per_step(model, DTYPES[run.precision], shards, run.grad_checkpointing,
                             lowest_trainable_layer(model), batch_size, data.max_source_length, data.max_target_length)
    say(f"memory per process, {world} x --dist {run.dist}{' (sharded)' if shards > 1 else ''}, batch {batch_size} x "
        f"{data.max_source_length + data.max_target_length} tokens, {run.precision}"
        f"{', --grad-checkpointing' if run.grad_checkpointing else ''} (an estimate; activations the roughest):")
    say("  " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items())
        + f"; total {sum(memory.values()) / 2**30:.2f} GiB")


def log_step(out: Path, progress: training.Progress, lr: float, norm: float, steps_per_epoch: int, board):
    """Rank 0: a trainer_log.jsonl line with the mean loss of the steps since the last one (and on the board)."""
    training.log(out, board, {"step": progress.step, "epoch": round(progress.step / steps_per_epoch, 4),
                              "loss": round(sum(progress.window) / len(progress.window), 6), "lr": lr,
                              "grad_norm": round(norm, 6), "tokens_per_s": round(progress.tokens_per_s(), 1)})
    progress.window = []


def run_validation(out: Path, trainer: Trainer, batches: list[tuple[dict, bool]], progress: training.Progress,
                   steps_per_epoch: int, board):
    """The validation loss into the Progress (the best so far) and, on rank 0, a trainer_log.jsonl line (and on
    the board)."""
    t0 = time.time()
    loss = validate(trainer, batches)
    progress.val_s += time.time() - t0
    progress.add_val(loss)
    if trainer.rank == 0:
        training.log(out, board, {"step": progress.step, "epoch": round(progress.step / steps_per_epoch, 4),
                                  "val_loss": round(loss, 6)})
        tqdm.write(f"step {progress.step}: {progress.val_text()}")


def finish(s: Settings, out: Path, trainer: Trainer, progress: training.Progress, steps_per_epoch: int,
           n_trainable: int):
    """The final adapter beside the logs (write_adapter leaves other files alone), train_results.json, the plot."""
    runtime, train_s = time.time() - progress.t0, progress.train_s()
    save_adapter = training.save_adapter_files(trainer, s.adapter)  # under FSDP2 a collective
    peak = max(all_gather(peak_memory_bytes(trainer.device), trainer.world))
    if trainer.rank != 0:
        return
    save_adapter(out)
    step = progress.step
    results = {"train_loss": progress.loss_total / max(step, 1), "steps": step,
               "epochs": round(step / steps_per_epoch, 4), "runtime_s": round(runtime, 2),
               "samples_per_s": round(progress.samples / train_s, 3),  # the training's speed: validation left out
               "tokens_per_s": round(progress.tokens / train_s, 1), "peak_memory_bytes": peak,
               **progress.val, "trainable_params": n_trainable, "world_size": trainer.world,
               "precision": s.run.precision,
               "fingerprint": {"code": code_fingerprint(), "data": data_fingerprint(s.data.dataset_dir, s.data.names),
                               "settings": digest(training.same_run_key(s.flags, trainer.world))}}
    write_json(out / TRAIN_RESULTS, results)
    if s.out.plot_loss:
        training.plot_loss(out / LOG, out / LOSS_PLOT)
    val = f"{progress.val_text()} | " if progress.val else ""
    print(f"train_loss {results['train_loss']:.4f} | {val}{results['tokens_per_s']:.0f} tokens/s | peak memory "
          f"{peak / 2**30:.2f} GiB | {out}")


def main(argv=None):
    s = parse_args(argv)
    if s.dry_run:  # no process group: `WORLD_SIZE=8 python train.py --dry-run` sizes an 8-GPU run on any machine
        world = int(os.environ.get("WORLD_SIZE", 1))
        check_quantize(s.run, s.adapter, world)
        dry_run(s.model, s.adapter, s.run, s.optim.batch_size, s.data, world, say_once)
        return
    rank, world, device = init_distributed(s.run.dist_timeout)
    try:
        train(s, rank, world, device)
        if world > 1:
            dist.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(training.resume_hint(Path(s.out.output_dir))) from None
    except torch.OutOfMemoryError as e:
        raise MemoryError(f"{OOM_HELP}\n({e})") from e
    except RuntimeError as e:
        if "can't allocate memory" in str(e):  # CPU allocator
            raise MemoryError(f"{OOM_HELP}\n({e})") from e
        if "Timed out" in str(e):  # gloo; NCCL's watchdog ends the process with its own message
            raise TimeoutError(f"a collective waited more than --dist-timeout {s.run.dist_timeout:g} minutes: "
                               f"another rank hung or died (see its output)\n({e})") from e
        raise
    finally:
        if world > 1:
            # Tear down together (the barrier above) and with nothing left that holds the group: without
            # both, gloo sometimes aborts a rank at exit ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    rank = os.environ.get("RANK")
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, MemoryError, TimeoutError, UntrainedError) as e:
        print(f"train.py: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk, a read-only or forbidden path: the last complete checkpoint stays
        print(f"train.py: error{f' (rank {rank})' if rank else ''}: {explain(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if rank in (None, "0"):
            print(f"\ntrain.py: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
