"""Freeze, P-Tuning v2, LoRA and full fine-tuning, one file each (freeze.py, ptuning.py, lora.py, full.py),
in one table (dispatch.METHODS); their files (files.py) and the merged export (export.py).

    from adapters import add_adapter_args, AdapterSpec, apply_adapter, float32_trainable, save_adapter, load_adapter
    spec = AdapterSpec.from_args(args, model.config.num_layers)
    apply_adapter(model, spec)          # only the method's tensors require grad
    float32_trainable(model)            # for training: those tensors in float32
    print(trainable_report(model))
    save_adapter(model, spec, out_dir)  # adapter.json + adapter_model.safetensors (+ PEFT's adapter_config.json)

LoRA and Freeze swap or unfreeze the model's own modules; the model knows one of them by name: P-Tuning's
prefix encoder (`transformer.prefix_encoder`, the reference's key names), whose key/values every layer takes.
"""
from .dispatch import (METHODS, AdapterSpec, add_adapter_args, apply_adapter, float32_trainable, trainable_report,
                       trainable_state_dict)
from .export import export_merged
from .files import (base_model_id, base_weights, load_adapter, load_weights, read_adapter, save_adapter,
                    write_adapter, write_peft_bin)
from .layers import parse_layers
from .lora import LoRALinear, merge_lora
from .ptuning import PrefixEncoder

__all__ = ["METHODS", "AdapterSpec", "LoRALinear", "PrefixEncoder", "add_adapter_args", "apply_adapter",
           "base_model_id", "base_weights", "export_merged", "float32_trainable", "load_adapter", "load_weights",
           "merge_lora", "parse_layers", "read_adapter", "save_adapter", "trainable_report", "trainable_state_dict",
           "write_adapter", "write_peft_bin"]
