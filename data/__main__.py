"""Inspect datasets as training will see them:
    python -m data --dataset roleplay_all_train --dataset-dir ../shared/data [--model tiny|DIR]
prints record counts, token-length percentiles (source, target, total), truncation counts and one rendered
sample with its label mask. Bad data exits with status 2 and a message naming file, record and fix.
"""
import argparse
import sys

from model.loss import IGNORE
from model.tokenizer import load_tokenizer
from runtime.files import reader_gone

from . import add_data_args, build_prompt, encode_train, format_report, load_records
from .encode import check_lengths, record_turns


def percentiles(values: list[int]) -> str:
    if not values:
        return "none"
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    return (f"mean {sum(v) / len(v):.1f}  p50 {at(0.5)}  p90 {at(0.9)}  p95 {at(0.95)}  p99 {at(0.99)}  "
            f"max {v[-1]}")


def render(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    rows = [f"{'pos':>4} {'id':>6}  {'label':>6}  piece"]
    for t, (i, lab) in enumerate(zip(input_ids, labels)):
        rows.append(f"{t:>4} {i:>6}  {'-100' if lab == IGNORE else lab:>6}  {tokenizer.sp.id_to_piece(i)}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = add_data_args(argparse.ArgumentParser(prog="python -m data", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model", default="tiny", help="preset or model dir whose tokenizer counts tokens")
    parser.add_argument("--seed", type=int, default=42, help="mixing seed (the rendered sample is the first)")
    args = parser.parse_args(argv)
    try:
        check_lengths(args.max_source_length, args.max_target_length)
        tokenizer = load_tokenizer(args.model)
        names = [n.strip() for n in args.dataset.split(",") if n.strip()]
        records, report = load_records(names, args.dataset_dir, args.max_samples, args.seed, args.skip_bad_records)
    except (ValueError, FileNotFoundError) as e:  # InputError, DataError: the file, the record and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))

    src_lens, tgt_lens, total_lens, cut_src, cut_tgt, first = [], [], [], 0, 0, None
    for record in records:
        for query, history, answer in record_turns(record, args.expand_history):
            prompt = build_prompt(query, history, args.source_prefix)
            s = len(tokenizer.encode(prompt, add_special_tokens=False))
            t = len(tokenizer.encode(answer, add_special_tokens=False))
            src_lens.append(s + 2)  # + [gMASK] <sop>
            tgt_lens.append(t + 1)  # + <eop>
            total_lens.append(s + t + 3)
            cut_src += s > args.max_source_length - 2
            cut_tgt += t > args.max_target_length - 1
            first = first or (prompt, answer)
    print(f"samples: {len(total_lens)} (expand_history={args.expand_history}), tokenizer {tokenizer.model_file}")
    print(f"source tokens (incl. [gMASK] <sop>): {percentiles(src_lens)}")
    print(f"target tokens (incl. <eop>):         {percentiles(tgt_lens)}")
    print(f"total tokens:                        {percentiles(total_lens)}")
    print(f"truncated: source {cut_src} (> {args.max_source_length}), target {cut_tgt} (> {args.max_target_length})")
    if first:
        prompt, answer = first
        input_ids, labels, _ = encode_train(tokenizer, prompt, answer, args.max_source_length, args.max_target_length)
        print(f"\n--- first sample: prompt text ---\n{prompt}\n--- response ---\n{answer}\n--- tokens ---")
        print(render(tokenizer, input_ids, labels))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m data ... | head`
        reader_gone()
