#!/usr/bin/env bash
# The study's grid (../shared/docs/experiment.md, study/grid.py): id 0 = the base model, ids 1-22 = method x
# target x layers x auxiliary set; each run is trained, then evaluated on the role-play test split and on
# alpaca-gpt4-zh (100 samples each); then the comparison table is printed. This script keeps the lanes, the
# lock, the progress and Ctrl-C; `python -m study` gives it the runs, their commands and what each still needs.
#
#   bash launch.sh                 # every id; finished runs are skipped, interrupted ones resumed
#   bash launch.sh 14 17           # chosen ids
#   bash launch.sh --rerun-stale   # also redo runs finished by other code
#   bash launch.sh --retrain-base  # the demo: make its base model again in RUNS/base-model (the grid then uses it)
#   bash launch.sh --dry-run [ids] # print every chosen run's commands, run nothing (needs no torch)
#
# Ctrl-C stops every run; the same command resumes them from their checkpoints (saved every 2 minutes of
# training in the demo, every 30 with MODEL). One launcher at a time per RUNS: a second one refuses and names
# the first. Logs are appended, one header line per attempt: RUNS/<run>/train.log and eval.log,
# RUNS/base-train.log.
#
# Environment:
#   MODEL     checkpoint directory (a downloaded THUDM/chatglm-6b). Unset: the demo, a tiny ChatGLM trained on
#             the bundled general-knowledge data (committed: data/demo/base-model), fine-tuned on the bundled
#             role-play data, on CPU, each run on one thread with its code paths pinned (study/grid.py).
#   DATA_DIR  dataset directory with dataset_info.json (default: the bundled demo data without MODEL,
#             ../shared/data with it when present)
#   NPROC     processes (GPUs) per run (default: the GPUs visible, else 1)
#   PARALLEL  runs side by side, each on its own NPROC GPUs (default 1; 2 for the CPU demo). With 8 GPUs,
#             NPROC=1 PARALLEL=8 runs eight single-GPU runs at once, as the study did on 8 A100s.
#   NNODES, NODE_RANK, RDZV_ENDPOINT, RDZV_ID  several machines per run (default NNODES=1): run the same
#             `bash launch.sh` on each machine, NODE_RANK=0..NNODES-1, with RUNS on a filesystem they all see;
#             every command then starts as `torchrun --nnodes NNODES --nproc_per_node NPROC --node_rank NODE_RANK
#             --rdzv_backend c10d --rdzv_endpoint RDZV_ENDPOINT --rdzv_id RDZV_ID-<run>-train` (-eval), so that the
#             machines meet at RDZV_ENDPOINT (host:port of node 0) once per command; RDZV_ID default: chatglm. One
#             run at a time (PARALLEL 1); each machine keeps its own lock and progress (launch-nodeK.*). Tried only
#             with --dry-run: train.py on two nodes is tested as two torchrun agents on one machine (README).
#   RUNS      output directory (default runs)
#   SEEDS     k: train and evaluate every chosen row with k seeds, 42, 43, ... (default 1: seed 42 only). Seed S
#             runs in RUNS/<id>-<name>-seedS (42: RUNS/<id>-<name>) with train.py and evaluate.py --seed S; the
#             table gives each row's mean +- sd over its seeds.
#   TRAIN_EXTRA, EVAL_EXTRA  arguments appended to every train.py (the demo's base model too) / evaluate.py
#             command, for quick trials: TRAIN_EXTRA="--max-steps 5" EVAL_EXTRA="--max-samples 4"
#   PY        the Python to run with (default: the .venv/ that scripts/env.sh builds; for --dry-run, which
#             needs no torch: python3)
set -euo pipefail
cd "$(dirname "$0")"

HOLDER="pid $$, since $(date '+%F %T'): ${MODEL:+MODEL=$MODEL }bash $0 $*"  # for a second launcher's refusal
DRY=0
RERUN=""
ARGS=()  # for python -m study: ids (it checks them) and --retrain-base
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --rerun-stale) RERUN=--rerun-stale ;;
        *) ARGS+=("$arg") ;;
    esac
done
GPUS=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
export NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}"

if [ "$DRY" = 1 ]; then
    export PY="${PY:-python3}"
    exec "$PY" -m study commands "${ARGS[@]}"
fi

"${PY:-python3}" -m study plan "${ARGS[@]}" >/dev/null || exit 2  # bad ids or settings, a damaged base: one line
[ -n "${PY:-}" ] || source scripts/env.sh
export PY
PLAN=$("$PY" -m study plan "${ARGS[@]}")
field() { awk -F'\t' -v k="$1" '$1 == k {print $2}' <<<"$PLAN"; }
for kv in $(field env); do export "$kv"; done  # the demo's pinned CPU code paths, for every command below
RUNS=$(field runs)
PARALLEL=$(field lanes)
N=$(grep -c $'^run\t' <<<"$PLAN")
TRAINS=$(awk -F'\t' '$1 == "run" && $4 != "-" {n++} END {print n + 0}' <<<"$PLAN")  # rows with a training

# One launcher per RUNS (per machine of a multi-node launch, whose machines share RUNS). The lock is held as long
# as this shell or any run it started lives.
mkdir -p "$RUNS"
LAUNCH="$RUNS/launch"
[ "${NNODES:-1}" -gt 1 ] && LAUNCH+="-node$NODE_RANK"
exec 9>>"$LAUNCH.lock"
flock -n 9 || { echo "launch.sh: $RUNS is in use by another launcher ($(cat "$LAUNCH.holder" 2>/dev/null));" \
    "wait for it or stop it" >&2; exit 1; }
echo "$HOLDER" >"$LAUNCH.holder"
PROGRESS="$LAUNCH.progress"
: >"$PROGRESS"
START=$(date +%s)

header() {  # LOG COMMAND...: the line that starts an attempt in LOG (logs are appended, never replaced)
    local log=$1; shift
    [ -n "$(tail -c 1 "$log" 2>/dev/null)" ] && echo >>"$log"  # an interrupted attempt can end mid-line
    echo "=== $(date '+%F %T') $*" >>"$log"
}

attempt() {  # LOG COMMAND...: run a command, its output appended to LOG
    header "$@"
    local log=$1; shift
    "$@" >>"$log" 2>&1
}

hms() {  # seconds -> 3m05s, 2h07m
    if [ "$1" -ge 3600 ]; then printf '%dh%02dm' $(($1 / 3600)) $(($1 % 3600 / 60))
    else printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); fi
}

# NAME PLANNED SECONDS|- MESSAGE...: the progress line of a finished row. PLANNED: 1 when the plan trains the row
# (even if this launch only evaluates or skips it), else 0. SECONDS: the row's training and evaluation, given
# only for a training that finished. The ETA is their mean times the planned trainings not yet reported: a base
# row, an evaluation again or a skip takes a fraction of a training and would make it say minutes for hours. A
# planned row that turns out finished counts until it is reached (python -m study next says so only then).
report() {
    local k passed trained secs eta=""
    {  # the lanes share the count: append and count under a lock
        flock 8
        echo "$2 $3" >&8
        read -r k passed trained secs < <(awk '{k++; p += $1} $2 != "-" {t++; s += $2}
            END {print k, p + 0, t + 0, s + 0}' "$PROGRESS")
    } 8>>"$PROGRESS"
    [ "$trained" -gt 0 ] && [ "$passed" -lt "$TRAINS" ] \
        && eta=", ETA $(hms $((secs / trained * (TRAINS - passed) / PARALLEL)))"
    echo "[launch] run $k/$N $1: ${*:4} (elapsed $(hms $(($(date +%s) - START)))$eta)"
}

# one run, as python -m study next says: train (resuming or over again) and evaluate, evaluate again, or skip
do_run() {  # NAME TRAIN_COMMAND EVAL_COMMAND TRAIN_LOG EVAL_LOG
    local name=$1 train=$2 eval=$3 train_log=$4 eval_log=$5 what mode t0 secs planned=0
    [ -n "$train" ] && planned=1
    read -r what mode < <("$PY" -m study next "$name" $RERUN) \
        || { echo "[launch] $name: python -m study next $name failed" >&2; return 1; }
    case "$what" in
        done) report "$name" $planned - "finished, skipped"; return 0 ;;
        stale) report "$name" $planned - "finished, but by other code (the table marks it; bash launch.sh" \
            "--rerun-stale redoes it), skipped"; return 0 ;;
    esac
    t0=$(date +%s)
    if [ "$what" = train ]; then
        echo "[launch] $name: training$([ "$mode" = --overwrite ] && echo " again (finished by other code)"), log $train_log"
        attempt "$train_log" $train $mode || {
            report "$name" $planned - "training failed, see $train_log" >&2; return 1; }
    fi
    echo "[launch] $name: evaluating, log $eval_log"
    attempt "$eval_log" $eval || {
        report "$name" $planned - "evaluation failed, see $eval_log" >&2; return 1; }
    secs=$(($(date +%s) - t0))
    report "$name" $planned "$([ "$what" = train ] && echo "$secs" || echo -)" "done in $(hms "$secs")"
}

lane() {  # $1 = lane index: runs every PARALLEL-th run on its own GPUs / CPU thread
    local k=0 status=0 kind name dir train eval train_log eval_log
    if [ "$GPUS" -gt 0 ]; then
        export CUDA_VISIBLE_DEVICES=$(seq -s, $(($1 * NPROC)) $(($1 * NPROC + NPROC - 1)))
    elif [ "$PARALLEL" -gt 1 ]; then
        export OMP_NUM_THREADS=1
    fi
    while IFS=$'\t' read -r kind name dir train eval train_log eval_log; do
        [ "$kind" = run ] || continue
        [ "$train" = - ] && train=""
        [ $((k % PARALLEL)) -eq "$1" ] && { do_run "$name" "$train" "$eval" "$train_log" "$eval_log" || status=1; }
        k=$((k + 1))
    done <<<"$PLAN"
    return $status
}

# Everything that runs long runs in its own process group, so that Ctrl-C reaches only this shell, which then
# stops the groups as a whole (torchrun, its workers, tee) and says how to go on.
GROUPS_RUNNING=()
in_group() { set -m; "$@" </dev/null & GROUPS_RUNNING+=($!); set +m; }
interrupted() {
    trap '' INT TERM HUP
    local pid
    for pid in "${GROUPS_RUNNING[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # The runs are gone when nothing holds the lock any more (their processes inherited it); KILL after 10 s.
    exec 9>&-
    flock -w 10 "$LAUNCH.lock" true \
        || for pid in "${GROUPS_RUNNING[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    printf '\n[launch] interrupted: the runs stopped; the same command resumes them (checkpoints are kept)\n' >&2
    exit 130
}
trap interrupted INT TERM HUP

if grep -q $'^base\t' <<<"$PLAN"; then  # --retrain-base: trained (resuming), its progress bar on screen; saved
    IFS=$'\t' read -r _ BASE_TRAIN BASE_SAVE < <(grep $'^base\t' <<<"$PLAN")
    BASE_LOG=$(field base_log)
    base_model() {
        header "$BASE_LOG" $BASE_TRAIN --resume
        $BASE_TRAIN --resume 2>&1 | tee -a "$BASE_LOG"
    }
    echo "[launch] training the demo's base model (tiny ChatGLM on the bundled general-knowledge data)"
    in_group base_model
    wait $! || { echo "[launch] base training failed: $BASE_LOG" >&2; exit 1; }
    $BASE_SAVE
    "$PY" -m study base-made
fi

lanes=()
for ((i = 0; i < PARALLEL; i++)); do in_group lane "$i"; lanes+=($!); done
status=0
for pid in "${lanes[@]}"; do wait "$pid" || status=1; done

"$PY" evaluate.py --runs "$RUNS"
[ "$(field compare)" = 1 ] && { "$PY" -m study compare "$RUNS" || true; }  # against the README's table
exit $status
