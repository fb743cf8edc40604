"""python -m adapters --model BASE --checkpoint ADAPTER_DIR --output OUT_DIR [--dtype bfloat16]

Merges an adapter into its base model and writes a checkpoint directory (adapters/export.py).
"""
from .export import main

main()
