"""Adapter files: only the trained tensors, in layouts that other tools read too.

An adapter directory holds
- `adapter.json` (ours): the method, its settings, and the base model's identity;
- `adapter_model.safetensors` under the key names the method's `to_files` gives, and the JSON files it
  adds: LoRA under PEFT's key names (`base_model.model.transformer.layers.25.attention.query_key_value.lora_A.weight`)
  next to PEFT's `adapter_config.json`; Freeze / full / P-Tuning under the model's own key names
  (P-Tuning: `transformer.prefix_encoder.embedding.weight`, the reference's names).
PEFT <= 0.3 reads only `adapter_model.bin`: `write_peft_bin` (`python -m adapters --peft-bin DIR`) writes it
beside a LoRA adapter's safetensors file, the same tensors under the same keys, and `save_adapter` keeps it in step.
`load_adapter` also reads LoRA adapters written by PEFT (no adapter.json; `.safetensors` or `.bin`)
and P-Tuning v2 weights saved by the reference code (prefix length and projection read off the shapes).
"""
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from model.loader import read_shard, save_safetensors
from runtime.files import InputError, digest, load_json, real_number, write_json, writing

from .dispatch import METHODS, AdapterSpec, apply_adapter, trainable_state_dict
from .lora import PEFT_PREFIX

ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size",
               "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")
WEIGHTS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
ADAPTER_FILES = ("adapter.json", "adapter_config.json", WEIGHTS, PEFT_BIN)
PREFIX_KEY = "transformer.prefix_encoder."


def base_model_id(config) -> str:
    """A short sha1 of the fields that decide the weights' shapes and meaning (not pre_seq_len)."""
    return digest(arch_of(config), "sha1")


def describe_base(arch: dict) -> str:
    return (f"hidden {arch['hidden_size']}, {arch['num_layers']} layers, {arch['num_attention_heads']} heads, "
            f"inner {arch['inner_hidden_size']}, vocab {arch['vocab_size']}")


def arch_of(config) -> dict:
    return {k: getattr(config, k) for k in ARCH_FIELDS}


def base_weights(model: nn.Module) -> dict | None:
    """A cheap fingerprint of the frozen base weights an adapter is trained on: the `weights_sketch` of four frozen
    tensors spread over the model (their names are stored with it). None where there is nothing to read: every
    tensor trained (full), or the weights are on the meta device or sharded (train.py computes it before sharding)."""
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen or any(p.device.type == "meta" or hasattr(p, "full_tensor") for _, p in frozen):
        return None
    names = sorted({frozen[i * (len(frozen) - 1) // 3][0] for i in range(4)})
    return {"tensors": names, "sketch": weights_sketch(model, names)}


SKETCH_SIGNS = torch.randint(0, 2, (8, 4096), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
SKETCH_TOLERANCE = 0.01


def weights_sketch(model: nn.Module, names: list[str]) -> list[list[float]]:
    """Per tensor, 8 sums of up to 4096 evenly spaced values with fixed random signs (SKETCH_SIGNS), over the values'
    norm. Loading the same weights stored in bf16, fp16 or fp32 moves a sum by about 2e-3 of that norm (each value's
    rounding error, at most 2^-9 of it, summed with random signs), far less than SKETCH_TOLERANCE; other weights
    move it by about 1. A hash of rounded values cannot do this: fp32 -> fp16 -> bf16 rounds some values twice."""
    params = dict(model.named_parameters())
    sketch = []
    for name in names:
        t = params[name].detach().flatten()
        sample = t[::max(1, t.numel() // 4096)][:4096].to("cpu", torch.float64)
        sums = SKETCH_SIGNS[:, :sample.numel()] @ sample / sample.norm().clamp(min=1e-30)  # (8,)
        sketch.append([round(x, 6) for x in sums.tolist()])
    return sketch


def check_base_weights(model: nn.Module, adapter_dir, force: bool = False):
    """Refuse an adapter whose stored base-weights sketch is not this model's (same shapes, other weights: e.g.
    another fine-tune of the same architecture). Adapters without one (PEFT, older) pass."""
    meta_file = Path(adapter_dir) / "adapter.json"
    stored = read_meta(meta_file)["base_model"].get("weights") if meta_file.is_file() else None
    params = dict(model.named_parameters())
    if not stored or "sketch" not in stored or not all(n in params for n in stored["tensors"]):
        return
    got = torch.tensor(weights_sketch(model, stored["tensors"]), dtype=torch.float64)
    off = (got - torch.tensor(stored["sketch"], dtype=torch.float64)).abs().max().item()
    if off > SKETCH_TOLERANCE and not force:
        raise InputError(f"{meta_file}: this adapter was trained on other base weights (the sketch of "
                         f"{', '.join(stored['tensors'])} differs by {off:.3f}, more than the {SKETCH_TOLERANCE} that "
                         "storing them in another precision can explain). Load the base it was trained on (--model), "
                         "or pass --force to apply it anyway")


# ---------------------------------------------------------------- saving

def save_adapter(model: nn.Module, spec: AdapterSpec, out_dir) -> Path:
    """Write the model's trainable tensors and the settings to `out_dir` (write_adapter)."""
    tensors = {k: t.to("cpu").contiguous() for k, t in trainable_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no trainable tensors to save: call apply_adapter first "
                         "(a merged LoRA model is a full model: save it with model.loader.save_model)")
    if next(iter(tensors.values())).device.type == "meta":
        raise ValueError("the model is on the meta device (a dry run): there are no weights to save")
    return write_adapter(tensors, spec, model.config, base_weights(model), out_dir)


def write_adapter(tensors: dict, spec: AdapterSpec, config, weights: dict | None, out_dir) -> Path:
    """The trained `tensors` (model key names, on the CPU), the settings and the base's identity (its config and
    the `base_weights` fingerprint `weights`) into `out_dir`.

    The files are written to a temp directory inside `out_dir`, then moved in one by one with
    `adapter.json` last, so a directory with adapter.json is complete. Other files in `out_dir`
    (logs, run.json) are left alone; adapter files of an earlier save are replaced, a LoRA adapter's
    adapter_model.bin (write_peft_bin) by one with the new tensors, any other method's by nothing.
    """
    meta = {"method": spec.method, "settings": spec.to_dict(),
            "base_model": {"id": base_model_id(config), **arch_of(config), "weights": weights}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, beside = METHODS[spec.method].to_files(config, spec, tensors)
    with writing(tmp / WEIGHTS):
        for name, content in beside.items():
            write_json(tmp / name, content)
        save_safetensors(tensors, tmp / WEIGHTS)
        if spec.method == "lora" and (out_dir / PEFT_BIN).is_file():
            torch.save(tensors, tmp / PEFT_BIN)
        write_json(tmp / "adapter.json", meta)

    written = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "adapter.json")  # adapter.json last
    (out_dir / "adapter.json").unlink(missing_ok=True)
    for name in ADAPTER_FILES:
        if name not in written:
            (out_dir / name).unlink(missing_ok=True)  # left over from a save with another method
    for name in written:
        os.replace(tmp / name, out_dir / name)
    tmp.rmdir()
    return out_dir


def write_peft_bin(adapter_dir) -> Path:
    """adapter_model.bin beside a LoRA adapter's adapter_model.safetensors: the same tensors under the same keys
    (PEFT's), for PEFT <= 0.3, which reads only the .bin. Written to a temp file and renamed."""
    d = Path(adapter_dir)
    method = read_meta(d / "adapter.json")["method"] if (d / "adapter.json").is_file() else None
    if method not in (None, "lora"):
        raise ValueError(f"{d}: a {METHODS[method].TITLE} adapter; only LoRA adapters have PEFT's layout "
                         "(adapter_config.json), so only they get an adapter_model.bin. Load this one with "
                         "evaluate.py --run, or merge it (python -m adapters --model BASE --adapter DIR "
                         "--output OUT)")
    if not (d / "adapter_config.json").is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: expected a LoRA adapter (adapter_config.json + {WEIGHTS}, as train.py "
                                "--method lora writes)")
    tensors = dict(each_tensor(d / WEIGHTS))
    tmp = d / (PEFT_BIN + ".tmp")
    with writing(d / PEFT_BIN):
        torch.save(tensors, tmp)
        os.replace(tmp, d / PEFT_BIN)
    return d / PEFT_BIN


# ---------------------------------------------------------------- reading

def weight_keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return list(f.keys())
        except SafetensorError as e:
            raise damaged(file, e) from None
    return list(read_shard(file))  # memory-mapped: only the keys are touched


def each_tensor(file: Path):
    """(key, tensor) of one weights file, one tensor in memory at a time (.bin files are memory-mapped)."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
        except SafetensorError as e:
            raise damaged(file, e) from None
    else:
        yield from read_shard(file).items()


def damaged(file: Path, e: Exception) -> InputError:
    return InputError(f"{file}: not a readable safetensors file ({e}); it is damaged or cut short: copy it again")


def model_key(key: str) -> str:
    """A key of an adapter file -> the model's parameter name: drops PEFT's `base_model.model.` prefix and
    an adapter name (`.lora_A.default.weight` -> `.lora_A.weight`)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def read_adapter(adapter_dir, config) -> tuple[AdapterSpec, Path]:
    """Which method an adapter directory holds and its weights file, checked against the base `config`."""
    d = Path(adapter_dir)
    if (d / "adapter.json").is_file():
        meta = read_meta(d / "adapter.json")
        base = meta["base_model"]
        if base["id"] != base_model_id(config):
            raise InputError(f"{d}: adapter made for base {base['id']} ({describe_base(base)}) but the model is "
                             f"{base_model_id(config)} ({describe_base(arch_of(config))}); "
                             "load the base model the adapter was trained on (--model)")
        # study/fingerprint.py: adapter_sha256 repeats this choice (it may not import torch): change both
        file = d / WEIGHTS if (d / WEIGHTS).exists() or not (d / PEFT_BIN).is_file() else d / PEFT_BIN
        spec, where = AdapterSpec.from_dict(meta["settings"]), d / "adapter.json"
    elif (d / "adapter_config.json").is_file():
        (spec, file), where = read_peft(d), d / "adapter_config.json"
    else:
        keys = {f: weight_keys(f) for f in candidate_files(d)}
        file = next((f for f, names in keys.items() if any(k.startswith(PREFIX_KEY) for k in names)), None)
        if file is None:
            raise FileNotFoundError(f"{d}: not an adapter directory. Expected adapter.json (written by train.py), "
                                    "adapter_config.json + adapter_model.safetensors/.bin (a PEFT LoRA adapter), or "
                                    "a P-Tuning v2 prefix saved by the reference code (pytorch_model.bin or "
                                    f"*.safetensors with {PREFIX_KEY}embedding.weight)")
        spec, where = read_reference_ptuning(file, keys[file]), file
    problems = spec.problems(config)
    if problems:
        raise InputError(f"{where}: settings {'; '.join(problems)}; the file was edited or is not for this model: "
                         "restore it, or train again")
    if not file.is_file():
        raise InputError(f"{file}: {'a directory' if file.is_dir() else 'missing'}, where the adapter's tensors "
                         "should be; restore the file, or train again")
    return spec, file


def read_meta(file: Path) -> dict:
    """adapter.json, checked for what reading it needs: the method, its settings and the base model's identity."""
    fix = "train.py writes this file: train again, or restore it"
    meta = load_json(file, fix)
    need = {"method": str, "settings": dict, "base_model": dict}
    wrong = [k for k, kind in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    described = ("id", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size")
    wrong += [f"base_model.{k}" for k in described if not wrong and k not in meta["base_model"]]
    if not wrong:
        wrong += [f"{k} (one of {', '.join(METHODS)})" for k, v in (("method", meta["method"]),
                  ("settings.method", meta["settings"].get("method"))) if not (isinstance(v, str) and v in METHODS)]
    weights = None if wrong else meta["base_model"].get("weights")
    if weights is not None and not sketch_ok(weights):
        wrong.append("base_model.weights (a sketch of the base weights, as train.py writes it)")
    if wrong:
        raise InputError(f"{file}: {', '.join(wrong)} missing or of the wrong type; {fix}")
    return meta


def sketch_ok(weights) -> bool:
    """base_model.weights as base_weights writes it: {"tensors": [names], "sketch": [[8 numbers] per name]}."""
    names, sketch = (weights.get("tensors"), weights.get("sketch")) if isinstance(weights, dict) else (None, None)
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return False
    return sketch is None or isinstance(sketch, list) and len(sketch) == len(names) and all(
        isinstance(row, list) and len(row) == len(SKETCH_SIGNS) and all(map(real_number, row)) for row in sketch)


def candidate_files(d: Path) -> list[Path]:
    first = [d / n for n in (WEIGHTS, "pytorch_model.bin", "model.safetensors")]
    rest = sorted(p for p in d.glob("*") if p.suffix in (".bin", ".safetensors"))
    return [p for p in dict.fromkeys(first + rest) if p.is_file()]


def read_peft(d: Path) -> tuple[AdapterSpec, Path]:
    """A LoRA adapter written by PEFT: settings from adapter_config.json, target modules from the weights' keys."""
    where = d / "adapter_config.json"
    cfg = load_json(where, "PEFT writes this file: restore it")
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(cfg).__name__}; PEFT writes it: restore it")
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{where}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise InputError(f"{where}: bias={cfg.get('bias')!r}, modules_to_save={cfg.get('modules_to_save')!r}; "
                         "only LoRA matrices are supported (bias 'none', no modules_to_save)")
    if cfg.get("fan_in_fan_out"):
        raise InputError(f"{where}: fan_in_fan_out=true is for Conv1D models (GPT-2), not ChatGLM")
    files = [d / n for n in (WEIGHTS, PEFT_BIN) if (d / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{d}: adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    # The weights say exactly which modules carry LoRA; PEFT's own suffix match may differ from ours.
    modules = sorted({model_key(k).rsplit(".lora_", 1)[0] for k in weight_keys(files[0]) if ".lora_" in k})
    if not modules:
        raise InputError(f"{files[0]}: no lora_A/lora_B tensors")
    spec = AdapterSpec(method="lora", lora_rank=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"),
                       lora_dropout=cfg.get("lora_dropout", 0.0), lora_target=modules)
    return spec, files[0]


def read_reference_ptuning(file: Path, keys: list[str]) -> AdapterSpec:
    """The reference code's P-Tuning v2 weights: pre_seq_len = the embedding's rows; projection = trans.* exist."""
    emb = PREFIX_KEY + "embedding.weight"
    if emb not in keys:
        raise InputError(f"{file}: has {PREFIX_KEY}* keys but no {emb}")
    shape = next(t.shape for k, t in each_tensor(file) if k == emb)
    return AdapterSpec(method="ptuning", pre_seq_len=int(shape[0]),
                       prefix_projection=any(k.startswith(PREFIX_KEY + "trans.") for k in keys))


# ---------------------------------------------------------------- loading

@torch.no_grad()
def load_weights(model: nn.Module, file: Path):
    """An adapter file's tensors into the model's trainable tensors (the adapter applied already): exactly
    those keys, with their shapes, each taking the dtype of the tensor it fills."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    keys = {model_key(k) for k in weight_keys(file)}
    unexpected, missing = sorted(keys - expected), sorted(expected - keys)
    if unexpected:
        raise InputError(f"{file}: tensors this adapter's method does not train: {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    if missing:
        raise InputError(f"{file}: tensors missing for this adapter's method: {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}; the file does not match its settings")
    for k, t in each_tensor(file):
        p = params[model_key(k)]
        if not t.is_floating_point():
            raise InputError(f"{file}: {k} is {t.dtype}; adapter tensors are floats: the file was not written by a "
                             "training run (train again, or restore it)")
        if not torch.isfinite(t).all():
            raise InputError(f"{file}: {k} holds NaN or inf: the training that wrote it diverged (train again with "
                             "a lower --lr) or the file is damaged")
        if tuple(t.shape) != tuple(p.shape):
            raise InputError(f"{file}: {k} has shape {tuple(t.shape)} but the model's {model_key(k)} has "
                             f"{tuple(p.shape)}: the adapter was made for another base model (this one: "
                             f"{describe_base(arch_of(model.config))})")
        p.copy_(t)


def load_adapter(model: nn.Module, adapter_dir, force: bool = False) -> AdapterSpec:
    """Apply the adapter in `adapter_dir` to a base model and load its weights, in place. -> its spec.
    An adapter trained on other base weights is refused unless `force` (check_base_weights).

    Loaded Freeze / full weights take the model's dtype (a bf16 model stays bf16 and runs without
    autocast); LoRA and prefix tensors are float32 modules that work with any model dtype.
    """
    spec, file = read_adapter(adapter_dir, model.config)
    try:
        apply_adapter(model, spec)
    except ValueError as e:  # lora_target names (e.g. from PEFT) that match no module of this model
        raise InputError(f"{adapter_dir}: cannot apply this adapter to the model: {e!s} (settings {spec.to_dict()})") \
            from None
    check_base_weights(model, adapter_dir, force)
    load_weights(model, file)
    return spec
