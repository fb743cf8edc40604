"""Fine-tune ChatGLM-6B with Freeze, P-Tuning v2, LoRA or all weights; one process or torchrun (DDP / FSDP2).

    python train.py --model tiny --method lora --target qkv --layers 3 --max-steps 20 --output-dir runs/demo
    torchrun --nproc_per_node 8 train.py --model /path/to/chatglm-6b --method lora --target qkv --layers 3 \\
        --dataset roleplay_all_train --dataset-dir ../shared/data --output-dir runs/lora-qkv

One optimizer step: --grad-accum micro-batches of --batch-size x world samples. Every rank builds the
same samples and the same global batches (data.global_batches depends on seed and epoch, not on the
world size) and takes its share. Logits are computed only where a label follows; the step's loss is
the sum of float32 token cross-entropies over the number of label tokens of the whole global step, so
2 ranks x 2 samples give the gradient of 1 process x 4 samples.
"""
import argparse
import gc
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import train_lib as lib
from files import append_jsonl, write_json
from runtime import DTYPES, init_distributed
from adapters import AdapterSpec, add_adapter_args, apply_adapter, save_adapter, trainable_report
from adapters.checkpoint import copy_weights, read_adapter
from data import add_data_args, build_train_samples, collate_train, format_report, global_batches, rank_share
from model import ChatGLMModel, load_config, load_model, load_tokenizer, token_loss_sum

OOM_HELP = ("out of memory. Knobs, cheapest first: a smaller --batch-size with a larger --grad-accum (same global "
            "batch), --grad-checkpointing, shorter --max-source-length / --max-target-length, --precision bf16, "
            "--dist fsdp (shards trainable weights, gradients and optimizer state)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help names every default: appended where an option's help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint directory (released ChatGLM-6B layout) or a preset: 'tiny' (random weights, "
                        "seed 0), 'chatglm-6b' (random weights; for --dry-run)")
    add_adapter_args(p)
    add_data_args(p)
    g = p.add_argument_group("optimisation (defaults: the study's settings)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of AdamW (betas 0.9, 0.999, eps 1e-8)")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training samples")
    g.add_argument("--max-steps", type=int, default=0, help="optimizer steps; 0: --epochs over the data")
    g.add_argument("--batch-size", type=int, default=8, help="samples per device per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--scheduler", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning-rate decay to 0 after the warmup (constant: none)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0 to --lr")
    g.add_argument("--weight-decay", type=float, default=0.0, help="on matrices only (not biases or norms)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm; 0: no clipping")
    g.add_argument("--seed", type=int, default=42, help="adapter init, batch order, dropout")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--precision", choices=sorted(DTYPES), default="bf16",
                   help="frozen weights are stored in this dtype and compute runs under autocast to it (also on "
                        "CPU, where bf16 is fast only with AVX512-BF16/AMX: use fp32 elsewhere); trainable weights "
                        "and the optimizer stay float32; fp16 adds loss scaling")
    g.add_argument("--dist", choices=["ddp", "fsdp"], default="ddp",
                   help="with several processes: DDP replicates the model; FSDP2 shards it (for --method full)")
    g.add_argument("--dist-timeout", type=float, default=30, help="minutes a collective may wait for a hung rank")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute trainable blocks in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each trainable block")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="outputs/train", help="the run directory (adapter, logs, checkpoints)")
    g.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (and at the end); 0: end only")
    g.add_argument("--logging-steps", type=int, default=10, help="a trainer_log.jsonl line every N steps")
    g.add_argument("--plot-loss", action="store_true", help="write training_loss.png")
    g.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint, if any")
    g.add_argument("--overwrite", action="store_true", help="replace a different run in --output-dir")
    g.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device, apply the adapter, print the trainable parameters, exit")
    args = p.parse_args(argv)
    for name in ("batch_size", "grad_accum", "epochs", "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


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


def train(args, rank: int, world: int, device: torch.device):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    config = load_config(args.model)
    spec = AdapterSpec.from_args(args, config.num_layers)  # an impossible layer selection fails here
    if args.dry_run:
        with torch.device("meta"):
            model = ChatGLMModel(config)
        apply_adapter(model, spec)
        say(f"{args.model}: {config.num_layers} layers, hidden {config.hidden_size}; {spec}")
        say(trainable_report(model))
        return

    # Everything that can be wrong with the request fails here, before a weight is loaded.
    out = Path(args.output_dir)
    run_config = lib.run_config(args, world)
    resume_from = lib.check_output_dir(out, run_config, args.resume, args.overwrite)
    if resume_from is not None and (out / "train_results.json").is_file():
        say(f"{out}: this run has finished (train_results.json); nothing to resume")
        return
    tokenizer = load_tokenizer(args.model)
    samples, report = build_train_samples(
        tokenizer, args.dataset.split(","), args.dataset_dir, max_samples=args.max_samples, seed=args.seed,
        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        source_prefix=args.source_prefix, expand_history=args.expand_history, skip_bad_records=args.skip_bad_records)
    if not samples:
        raise ValueError(f"--dataset {args.dataset} in {args.dataset_dir} gave no training samples")
    say(format_report(report))
    targets = [sum(t != -100 for t in s["labels"][1:]) for s in samples]  # label tokens per sample
    lengths = [len(s["input_ids"]) for s in samples]
    global_batch = args.batch_size * world
    steps_per_epoch = math.ceil(math.ceil(len(samples) / global_batch) / args.grad_accum)
    total = args.max_steps or args.epochs * steps_per_epoch

    torch.manual_seed(args.seed)  # the adapter's random init is the same on every rank
    model = load_model(args.model, dtype=DTYPES[args.precision], device=device)
    apply_adapter(model, spec)
    if resume_from is not None:  # into float32 trainable tensors (adapters.load_adapter keeps the base dtype)
        copy_weights(model, read_adapter(resume_from, model.config)[1])
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise ValueError(f"{spec} leaves no trainable parameter")
    for block in model.transformer.layers[lowest_trainable_layer(model):]:
        if args.grad_checkpointing:
            block.forward = checkpointed(block.forward)
        if args.compile:
            block.compile()

    fsdp = world > 1 and args.dist == "fsdp"
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        half = DTYPES[args.precision] if args.precision != "fp32" else None
        lib.shard_fsdp2(model, MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32))
        wrapped = model
    elif world > 1:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # after sharding: DTensors
    params = [p for _, p in named]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lib.lr_lambda(args.scheduler, args.warmup_steps, total))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=args.precision != "fp32")

    step, loss_total, window = 0, 0.0, []
    log_file = out / "trainer_log.jsonl"
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)  # our own file: RNG tuples
        step, loss_total, window = state["step"], state["loss_total"], state["window"]
        lib.load_optimizer_state(model, optimizer, resume_from / "optimizer.pt", fsdp, master)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        lib.set_rng_state(state["rng"][rank], device)
    else:
        torch.manual_seed(args.seed + rank)  # dropout masks differ between ranks
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            lib.clear_outputs(out)
        lib.truncate_log(log_file, step)
        write_json(out / "run_config.json", {**run_config, "trainable_params": n_trainable})
        say(trainable_report(model))
        say(f"{len(samples)} samples, {steps_per_epoch} steps per epoch, {total} steps, global batch "
            f"{global_batch * args.grad_accum}, {world} x {device.type}, {args.precision}"
            + (f", resuming at step {step} from {resume_from}" if resume_from else ""))
    if world > 1:
        dist.barrier()

    def save_trainable(dest):
        """The adapter into `dest` (rank 0). Under FSDP2 a collective: the full trainable tensors are
        gathered and rank 0 saves them through a meta-device copy of the model that holds them."""
        if not fsdp:
            if master:
                save_adapter(model, spec, dest)
            return
        full = lib.full_trainable_state(model)
        if master:
            with torch.device("meta"):
                shadow = ChatGLMModel(config)
            apply_adapter(shadow, spec)
            shadow.load_state_dict(full, strict=False, assign=True)
            save_adapter(shadow, spec, dest)

    def checkpoint(step):
        optim_state = lib.optimizer_state(model, optimizer, fsdp)
        rngs = lib.all_gather(lib.rng_state(device), world)
        if master:
            state = {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                     "loss_total": loss_total, "window": window, "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rngs, "world_size": world}
            lib.write_checkpoint(out, step, save_trainable, optim_state, state)
        else:
            save_trainable(None)
        if world > 1:
            dist.barrier()

    grad_sums, batches, batches_epoch = [], None, -1
    t0, tokens_seen, samples_seen = time.time(), 0.0, 0
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True, desc=spec.method)
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = global_batches(lengths, global_batch, args.seed, epoch), epoch
        micro = batches[k * args.grad_accum:(k + 1) * args.grad_accum]
        n_targets = max(1, sum(targets[i] for b in micro for i in b))  # of the whole global step
        local = torch.zeros(2, device=device)  # loss sum, input tokens
        for j, global_ids in enumerate(micro):
            ids = rank_share(global_ids, rank, world)
            weight = world / n_targets  # DDP and FSDP2 average gradients over ranks; x world undoes it
            if not ids:  # fewer samples than ranks: a zero-weight pass keeps the collectives in step
                ids, weight = global_ids[:1], 0.0
            batch = collate_train([samples[i] for i in ids], tokenizer.pad_id)
            with sync_gradients(wrapped, j == len(micro) - 1, fsdp):
                with autocast:
                    loss_sum = token_loss_sum(wrapped, batch, device)
                scaler.scale(loss_sum * weight).backward()
            if weight:
                local += torch.stack([loss_sum.detach(), batch["attention_mask"].sum().to(device, torch.float32)])
        if world > 1:
            dist.all_reduce(local)
        loss, lr = local[0].item() / n_targets, scheduler.get_last_lr()[0]
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1} (lr {lr:.3g}); lower --lr or --warmup-steps"
                                     f" up, use --precision bf16 rather than fp16, or look for broken samples")
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if step < 2:  # the untrained-tensor check (see train_lib.untrained_tensors for why two steps)
            grad_sums.append(lib.grad_sums(params, fsdp, device))
            if len(grad_sums) == min(2, total):
                bad = lib.untrained_tensors([n for n, _ in named], grad_sums, zero_ok=total == 1)
                if bad:
                    raise lib.UntrainedError(
                        f"{len(bad)} trainable tensor(s) got no gradient in the first {len(grad_sums)} steps: "
                        f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. The adapter is not on the "
                        "loss's path (a detach, a hook, a module the forward never calls)")
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_total += loss
        window.append(loss)
        tokens_seen += local[1].item()
        samples_seen += sum(len(b) for b in micro)
        tokens_per_s = tokens_seen / (time.time() - t0)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        bar.update(1)
        if master and (step % args.logging_steps == 0 or step == total):
            append_jsonl(log_file, {"step": step, "epoch": round(step / steps_per_epoch, 4),
                                        "loss": round(sum(window) / len(window), 6), "lr": lr,
                                        "grad_norm": round(norm, 6), "tokens_per_s": round(tokens_per_s, 1)})
            window = []
        if (args.save_steps and step % args.save_steps == 0) or step == total:
            checkpoint(step)
    bar.close()

    runtime = time.time() - t0
    save_trainable(out)  # the final adapter, beside the logs (save_adapter leaves other files alone)
    peak = max(lib.all_gather(lib.peak_memory_bytes(device), world))
    if master:
        results = {"train_loss": loss_total / max(step, 1), "steps": step, "epochs": round(step / steps_per_epoch, 4),
                   "runtime_s": round(runtime, 2), "samples_per_s": round(samples_seen / runtime, 3),
                   "tokens_per_s": round(tokens_seen / runtime, 1), "peak_memory_bytes": peak,
                   "trainable_params": n_trainable, "world_size": world, "precision": args.precision}
        write_json(out / "train_results.json", results)
        if args.plot_loss:
            lib.plot_loss(log_file, out / "training_loss.png")
        say(f"train_loss {results['train_loss']:.4f} | {results['tokens_per_s']:.0f} tokens/s | peak memory "
            f"{peak / 2**30:.2f} GiB | {out}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.dist_timeout)
    try:
        train(args, rank, world, device)
        if world > 1:
            dist.barrier()
    except torch.OutOfMemoryError as e:
        raise MemoryError(f"{OOM_HELP}\n({e})") from e
    except RuntimeError as e:
        if "can't allocate memory" in str(e):  # CPU allocator
            raise MemoryError(f"{OOM_HELP}\n({e})") from e
        if "Timed out" in str(e):  # gloo; NCCL's watchdog ends the process with its own message
            raise TimeoutError(f"a collective waited more than --dist-timeout {args.dist_timeout:g} minutes: "
                               f"another rank hung or died (see its output)\n({e})") from e
        raise
    finally:
        if world > 1:
            # Tear down together (the barrier above) and with nothing left that holds the group: without
            # both, gloo sometimes aborts a rank at exit ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, MemoryError, TimeoutError, lib.UntrainedError) as e:
        rank = os.environ.get("RANK")
        print(f"train.py: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(1)
