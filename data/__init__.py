"""The study's data path: registered JSON files -> validated records -> prompt text -> token ids -> batches.

`python -m data --dataset NAME --dataset-dir DIR` inspects a dataset (counts, lengths, one rendered sample).
"""
from pathlib import Path

from flags import COUNT, number

from .batching import collate_train, global_batches, rank_share
from .encode import (IGNORE, build_eval_samples, build_train_samples, encode_prompt, encode_records, encode_train,
                     format_report)
from .prompt import build_prompt
from .registry import RESERVED_STRINGS, DataError, hold_out, load_records, read_dataset_info

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def add_data_args(parser):
    """The data flags shared by train.py, evaluate.py and `python -m data` (defaults: the study's)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="roleplay_all_train",
                   help="comma-separated dataset names registered in DIR/dataset_info.json")
    g.add_argument("--dataset-dir", default=str(DEMO_DIR),
                   help="directory with dataset_info.json (the bundled demo data unless given)")
    g.add_argument("--max-samples", type=COUNT, default=None,
                   help="keep the first N records of each dataset (file order, before dropping empty ones)")
    g.add_argument("--max-source-length", type=number(int, low=2), default=512,
                   help="prompt tokens incl. [gMASK] <sop>; longer prompts keep their beginning")
    g.add_argument("--max-target-length", type=number(int, low=2), default=512, help="answer tokens incl. <eop>")
    g.add_argument("--source-prefix", default="", help="text put in front of every prompt")
    g.add_argument("--expand-history", action="store_true",
                   help="train on every answer of a multi-turn record, not only the last")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) malformed records instead of stopping at the first one")
    return parser


__all__ = ["DEMO_DIR", "IGNORE", "RESERVED_STRINGS", "DataError", "add_data_args", "build_eval_samples",
           "build_prompt", "build_train_samples", "collate_train", "encode_prompt", "encode_records",
           "encode_train", "format_report", "global_batches", "hold_out", "load_records", "rank_share",
           "read_dataset_info"]
