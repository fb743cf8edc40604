"""The study's data path: registered JSON files -> validated records -> prompt text -> token ids -> batches.

`python -m data --dataset NAME --dataset-dir DIR` inspects a dataset (counts, lengths, one rendered sample).
"""
from dataclasses import dataclass
from pathlib import Path

from runtime.flags import COUNT, number

from .batching import collate_train, global_batches, rank_share
from .encode import build_eval_samples, encode_prompt, encode_records, encode_train, format_report
from .prompt import build_prompt
from .registry import RESERVED_STRINGS, DataError, hold_out, load_records, read_dataset_info

DEMO_DIR = Path(__file__).resolve().parent / "demo"


@dataclass(frozen=True)
class DataSettings:
    """The data flags (add_data_args), read once; the defaults are the study's."""
    dataset: str = "roleplay_all_train"  # comma-separated names
    dataset_dir: str = str(DEMO_DIR)
    max_samples: int | None = None
    max_source_length: int = 512
    max_target_length: int = 512
    source_prefix: str = ""
    expand_history: bool = False
    skip_bad_records: bool = False

    @property
    def names(self) -> list[str]:
        return self.dataset.split(",")


def add_data_args(parser):
    """The data flags shared by train.py, evaluate.py and `python -m data` (DataSettings)."""
    d = DataSettings
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help="comma-separated dataset names registered in DIR/dataset_info.json")
    g.add_argument("--dataset-dir", default=d.dataset_dir,
                   help="directory with dataset_info.json (the bundled demo data unless given)")
    g.add_argument("--max-samples", type=COUNT, default=d.max_samples,
                   help="keep the first N records of each dataset (file order, before dropping empty ones)")
    g.add_argument("--max-source-length", type=number(int, low=2), default=d.max_source_length,
                   help="prompt tokens incl. [gMASK] <sop>; longer prompts keep their beginning")
    g.add_argument("--max-target-length", type=number(int, low=2), default=d.max_target_length,
                   help="answer tokens incl. <eop>")
    g.add_argument("--source-prefix", default=d.source_prefix, help="text put in front of every prompt")
    g.add_argument("--expand-history", action="store_true",
                   help="train on every answer of a multi-turn record, not only the last")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) malformed records instead of stopping at the first one")
    return parser


__all__ = ["DEMO_DIR", "RESERVED_STRINGS", "DataError", "DataSettings", "add_data_args", "build_eval_samples",
           "build_prompt", "collate_train", "encode_prompt", "encode_records", "encode_train", "format_report",
           "global_batches", "hold_out", "load_records", "rank_share", "read_dataset_info"]
