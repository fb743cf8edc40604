#!/usr/bin/env bash
# Does the demo table reproduce bit for bit, and is it the README's? Runs `bash launch.sh` twice from scratch, each in
# a fresh clone of this commit: once on a quiet machine; once beside a CPU-burning process (niced) and with MKL
# held to AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2, what MKL dispatches to on a CPU without AVX-512; PyTorch's own
# kernels the launcher pins to AVX2 on every CPU that has it). Then compares the two runs/results.md, and each
# runs/ with the README's table cell by cell (python -m study compare). Prints the two runs' timing and
# "identical" or the difference; exit 1 if the tables differ or a cell is outside the measured spread.
#
#   bash scripts/reproduce.sh [WORK_DIR]      # about 11 + 20 minutes on 2 CPU cores
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
COMMIT=$(git -C "$REPO" rev-parse HEAD)
mkdir -p "$WORK"

run_grid() {  # $1 = clone name, then VAR=VALUE ... for launch.sh
    local dir="$WORK/$1" start name=$1
    shift
    rm -rf "$dir"
    git clone -q "$REPO" "$dir"
    git -C "$dir" checkout -q "$COMMIT"
    [ -d "$REPO/.venv" ] && ln -s "$REPO/.venv" "$dir/.venv"  # the same environment, no reinstall
    start=$(date +%s)
    (cd "$dir" && env "$@" bash launch.sh > "$WORK/$name.log" 2>&1)
    echo "[reproduce] $name${*:+ ($*)}: bash launch.sh took $(( $(date +%s) - start )) s (log: $WORK/$name.log)"
    tail -1 "$WORK/$name.log"  # python -m study compare's summary
}

run_grid quiet
# The CPU-burning process, at the lowest priority: it takes every cycle the runs leave and shifts their timing.
nice -n 19 bash -c 'while :; do :; done' &
burner=$!
trap 'kill $burner 2>/dev/null || true' EXIT
run_grid loaded MKL_ENABLE_INSTRUCTIONS=AVX2
kill $burner 2>/dev/null || true

grep -q "outside it" "$WORK/quiet.log" "$WORK/loaded.log" && { echo "[reproduce] cells outside the spread" >&2; exit 1; }
if cmp -s "$WORK/quiet/runs/results.md" "$WORK/loaded/runs/results.md"; then
    echo "[reproduce] identical tables at $COMMIT ($WORK/quiet/runs/results.md)"
else
    diff "$WORK/quiet/runs/results.md" "$WORK/loaded/runs/results.md" || true
    echo "[reproduce] the tables differ at $COMMIT" >&2
    exit 1
fi
