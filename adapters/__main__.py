"""python -m adapters --model BASE --adapter ADAPTER_DIR --output OUT_DIR [--precision bf16]
python -m adapters --peft-bin ADAPTER_DIR

Merges an adapter into its base model and writes a model directory, or writes a LoRA adapter's
adapter_model.bin for PEFT <= 0.3 (adapters/export.py).
"""
import sys

from runtime.files import explain

from .export import main

try:
    main()
except (ValueError, FileNotFoundError) as e:
    print(f"python -m adapters: error: {e}", file=sys.stderr)
    sys.exit(1)
except OSError as e:  # a full disk, a read-only or forbidden path
    print(f"python -m adapters: error: {explain(e)}", file=sys.stderr)
    sys.exit(1)
