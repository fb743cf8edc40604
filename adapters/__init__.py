"""Freeze, P-Tuning v2 and LoRA for ChatGLM-6B, one small file each; the model file never knows about them.

    from adapters import add_adapter_args, AdapterSpec, apply_adapter, save_adapter, load_adapter
    spec = AdapterSpec.from_args(args, model.config.num_layers)
    apply_adapter(model, spec)          # only the method's tensors require grad, in float32
    print(trainable_report(model))
    save_adapter(model, spec, out_dir)  # adapter.json + adapter_model.safetensors (+ PEFT's adapter_config.json)
"""
from .checkpoint import (base_model_id, base_weights, copy_weights, load_adapter, read_adapter, save_adapter,
                         write_peft_bin)
from .dispatch import (METHODS, AdapterSpec, add_adapter_args, apply_adapter, attach_adapter, trainable_report,
                       trainable_state_dict)
from .export import export_merged
from .layers import parse_layers
from .lora import LoRALinear, merge_lora
from .ptuning import PrefixEncoder

__all__ = ["METHODS", "AdapterSpec", "LoRALinear", "PrefixEncoder", "add_adapter_args", "apply_adapter",
           "attach_adapter", "base_model_id", "base_weights", "copy_weights", "export_merged", "load_adapter",
           "merge_lora", "parse_layers", "read_adapter", "save_adapter", "trainable_report", "trainable_state_dict",
           "write_peft_bin"]
