"""Read and write model directories in the released layout, shard by shard.

Reading: the model is built on the meta device, allocated once in the target dtype and device,
then each shard is copied in and dropped before the next is read, so a 13 GB model never
exists twice. Writing: sharded safetensors + `model.safetensors.index.json` + `config.json`.
"""
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.files import InputError, load_json, replace_dir, write_json

from .chatglm import ChatGLMModel
from .config import PRESETS, ChatGLMConfig
from .tokenizer import tokenizer_config_json

IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # recomputed (chatglm.rotary_inv_freq)
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TIED = {"lm_head.weight": "transformer.word_embeddings.weight"}  # stored key -> the one matrix, when tied
# What the released config.json says beyond the architecture, so that transformers finds the model's code
# (the released .py files beside the weights: AutoModel.from_pretrained(DIR, trust_remote_code=True)).
RELEASED_CONFIG = {"architectures": ["ChatGLMModel"],
                   "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model directory, in the order the index lists them."""
    for index_name in INDEXES:
        index = path / index_name
        if index.is_file():
            fix = "fix it, or copy it from the released model again"
            weight_map = load_json(index, fix)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..") for v in weight_map.values()):
                raise InputError(f"{index}: \"weight_map\" must map each tensor name to a file name in the "
                                 f"directory; {fix}")
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index} lists {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, "
                                 "not a file in the directory; download the missing shards")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json); "
                            "point --model at a ChatGLM-6B model directory or use a preset "
                            f"({', '.join(sorted(PRESETS))})")


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """One shard on CPU. `.bin` files are pickles: only `weights_only` loading, memory-mapped when possible."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        try:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            shard = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # a truncated or foreign file: say which one
        raise InputError(f"cannot read weight shard {file}: {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
                         "Re-download the file (compare its size with the index) or save the model again.") from None
    if not isinstance(shard, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in shard.items()):
        raise InputError(f"{file}: holds a {type(shard).__name__} that is not a state dict (names -> tensors); "
                         "save the weights with torch.save(model.state_dict(), ...)")
    return shard


def load_state_dict_into(model: ChatGLMModel, files: list[Path], strict: bool = True) -> set[str]:
    """Copy shards into an allocated model key by key. Returns the keys loaded.

    Missing keys, unexpected keys and shape mismatches are errors that name the file and the keys. A tied
    model (config.tie_word_embeddings) has one matrix for both keys of TIED; a model directory may store both
    (the released one does) when they hold the same values.
    """
    params = dict(model.named_parameters())
    alias = TIED if model.config.tie_word_embeddings else {}
    loaded = set()
    for file in files:
        shard = read_shard(file)
        unexpected = [k for k in shard if alias.get(k, k) not in params and not k.endswith(IGNORED_SUFFIXES)]
        if unexpected and strict:
            raise InputError(f"{file}: keys the model does not have: {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}; is this a ChatGLM-6B model?")
        with torch.no_grad():
            for k, t in shard.items():
                name = alias.get(k, k)
                if name not in params:
                    continue
                if tuple(t.shape) != tuple(params[name].shape):
                    raise InputError(f"{file}: {k} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(params[name].shape)}; config.json does not match these weights")
                if not t.is_floating_point():
                    raise InputError(f"{file}: {k} is {t.dtype}; base weights are floats (a quantized checkpoint "
                                     "such as chatglm-6b-int8 is not read: load the float model, quantize with "
                                     "--quantize)")
                if not torch.isfinite(t).all():
                    raise InputError(f"{file}: {k} holds NaN or inf; the file is damaged: download it again")
                if name in loaded:  # the second of two tied keys: the matrix is already there
                    check_tied(params[name], t, file)
                    continue
                params[name].copy_(t)
                loaded.add(name)
        del shard
    missing = sorted(set(params) - loaded)
    if missing and strict:
        raise InputError(f"{files[0].parent}: keys missing from the weights: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return loaded


def check_size(model: ChatGLMModel, files: list[Path]):
    """Before allocating: refuse a config.json that describes more weights than its files hold bytes (they hold two
    a weight at least: int8 files are refused anyway), say a hand-edited hidden_size of 10^5. Smaller mismatches
    are found key by key as the shards are read."""
    stored = sum(p.numel() for p in model.parameters())  # a tied matrix once
    size = declared_bytes(files)
    if stored > size:
        raise InputError(f"{files[0].parent / 'config.json'} describes {stored:,} weights, but the weight files "
                         f"hold {size:,} bytes: config.json does not match the weights; copy it from the released "
                         "model again")


def declared_bytes(files: list[Path]) -> int:
    """The weights' size: the index's metadata.total_size where it gives one (then a shard cut short is named when
    it is read, not taken for a wrong config.json), else the files' sizes."""
    for name in INDEXES:
        index = files[0].parent / name
        if index.is_file():
            meta = load_json(index, "").get("metadata")  # weight_files read it: a JSON object
            total = meta.get("total_size") if isinstance(meta, dict) else None
            if isinstance(total, int) and not isinstance(total, bool) and total > 0:
                return total
    return sum(f.stat().st_size for f in files)


def check_tied(param: torch.Tensor, stored: torch.Tensor, file: Path):
    if not torch.equal(param, stored.to(param.device, param.dtype)):
        raise InputError(f"{file}: {' and '.join(*TIED.items())} hold different values, but the model ties them "
                         "(tie_word_embeddings is true, also when config.json does not set it, as in transformers). "
                         "To load two separate matrices, set \"tie_word_embeddings\": false in "
                         f"{file.parent / 'config.json'}")


def load_config(path_or_preset) -> ChatGLMConfig:
    """The config of a preset name or a model directory, without reading any weights."""
    if str(path_or_preset) in PRESETS:
        return ChatGLMConfig.from_name(str(path_or_preset))
    path = Path(path_or_preset) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --model takes a model directory or a preset "
                                f"({', '.join(sorted(PRESETS))})")
    return ChatGLMConfig.from_json(path)


def load_model(path_or_preset, dtype=torch.float32, device="cpu", seed: int = 0) -> ChatGLMModel:
    """A preset name (random weights from `seed`) or a released model directory -> model in eval mode."""
    config = load_config(path_or_preset)
    files = None if str(path_or_preset) in PRESETS else weight_files(Path(path_or_preset))
    with torch.device("meta"):
        model = ChatGLMModel(config)
    if files is not None:
        check_size(model, files)
    model = model.to(dtype).to_empty(device=device)  # one allocation, already in the target dtype
    if files is None:
        model.init_weights(seed)
    else:
        load_state_dict_into(model, files)
    return model.eval()


def save_safetensors(tensors: dict, path):
    """safetensors.torch.save_file with the mode every other file gets (0644 under the usual umask): the library
    creates its files 0600."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_model(state_dict: dict, config: ChatGLMConfig, out_dir, max_shard_bytes: int = 2 << 30,
               tokenizer_file=None, copy_files=()):
    """Write `state_dict` (released key names) as sharded safetensors + index + config.json, atomically:
    everything goes to a sibling temp directory that replaces `out_dir` only when complete.

    config.json is the released one's keys plus ours, `tie_word_embeddings` included (transformers ties the
    output layer to the embedding when the key is missing). `copy_files` are copied in last under their own
    names (a base's modeling_chatglm.py, its tokenizer_config.json over ours)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t.detach().to("cpu").contiguous()
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, tmp / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype = next(t.dtype for t in state_dict.values() if t.is_floating_point())
    write_json(tmp / "config.json", {**config.to_dict(), **RELEASED_CONFIG,
                                     "torch_dtype": str(dtype).removeprefix("torch.")})
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "ice_text.model")
        (tmp / "tokenizer_config.json").write_text(tokenizer_config_json() + "\n", encoding="utf-8")
    for file in copy_files:
        shutil.copyfile(file, tmp / Path(file).name)
    replace_dir(tmp, out_dir)
    return out_dir
