#!/usr/bin/env bash
# The study's grid (../shared/docs/experiment.md): id 0 = the base model, ids 1-22 = method x target x
# layers x auxiliary set; each run is trained, then evaluated on the role-play test split and on
# alpaca-gpt4-zh (100 samples each); then the comparison table is printed.
#
#   bash launch.sh                 # every id; finished runs are skipped, interrupted ones resumed
#   bash launch.sh 14 17           # chosen ids
#   bash launch.sh --rerun-stale   # also redo runs finished by other code (python -m fingerprint RUN_DIR says which)
#   bash launch.sh --dry-run [ids] # print every chosen run's commands, run nothing (needs no torch)
#
# Ctrl-C stops every run; the same command resumes them from their checkpoints (saved every 2 minutes of
# training in the demo, every 30 with MODEL). One launcher at a time per RUNS: a second one refuses and names
# the first. Logs are appended, one header line per attempt: RUNS/<run>/train.log and eval.log,
# RUNS/base-train.log.
#
# Environment:
#   MODEL     checkpoint directory (a downloaded THUDM/chatglm-6b). Unset: the embedded default, a tiny
#             ChatGLM first trained here on the bundled general-knowledge data, then fine-tuned on the
#             bundled role-play data, on CPU.
#   DATA_DIR  dataset directory with dataset_info.json (default: the bundled demo data without MODEL,
#             ../shared/data with it when present)
#   NPROC     processes (GPUs) per run (default: the GPUs visible, else 1)
#   PARALLEL  runs side by side, each on its own NPROC GPUs (default 1; 2 for the CPU demo). With 8 GPUs,
#             NPROC=1 PARALLEL=8 runs eight single-GPU runs at once, as the study did on 8 A100s.
#   RUNS      output directory (default runs)
#   SEEDS     k: train and evaluate every chosen row with k seeds, 42, 43, ... (default 1: seed 42 only). Seed S
#             runs in RUNS/<id>-<name>-seedS (42: RUNS/<id>-<name>) with train.py and evaluate.py --seed S; the
#             table gives each row's mean +- sd over its seeds.
#   TRAIN_EXTRA, EVAL_EXTRA  arguments appended to every train.py (the demo's base model too) / evaluate.py
#             command, for quick trials: TRAIN_EXTRA="--max-steps 5" EVAL_EXTRA="--max-samples 4"
#   PY        the Python to run with (default: the .venv/ that scripts/env.sh builds; for --dry-run, which
#             only reads MODEL/config.json with it: python3)
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "launch.sh: $*" >&2; exit 2; }

HOLDER="pid $$, since $(date '+%F %T'): ${MODEL:+MODEL=$MODEL }bash $0 $*"  # for a second launcher's refusal
DRY=0
RERUN=""
IDS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --rerun-stale) RERUN=--rerun-stale ;;
        ''|*[!0-9]*) fail "unknown argument '$arg' (ids are 0-22; --dry-run, --rerun-stale)" ;;
        *) [ "$((10#$arg))" -le 22 ] || fail "no run id $arg (ids are 0-22)"; IDS+=("$((10#$arg))") ;;
    esac
done

RUNS="${RUNS:-runs}"
SEEDS="${SEEDS:-1}"
case "$SEEDS" in ''|*[!0-9]*|0) fail "SEEDS=$SEEDS: expected a number of seeds, at least 1" ;; esac
GPUS=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}"
EVAL_SETS="roleplay_all_test,alpaca_gpt4_zh"

#   id method  target layers aux   (layers: last3 = the last three layers, 25-27 on ChatGLM-6B)
GRID="
0  base    -   -      no
1  freeze  mlp last3  no
2  freeze  mlp last3  yes
3  freeze  mlp first3 no
4  freeze  mlp first3 yes
5  freeze  qkv last3  no
6  freeze  qkv last3  yes
7  freeze  qkv first3 no
8  freeze  qkv first3 yes
9  ptuning -   -      no
10 ptuning -   -      yes
11 lora    mlp last3  no
12 lora    mlp last3  yes
13 lora    mlp first3 no
14 lora    mlp first3 yes
15 lora    mlp all    no
16 lora    mlp all    yes
17 lora    qkv last3  no
18 lora    qkv last3  yes
19 lora    qkv first3 no
20 lora    qkv first3 yes
21 lora    qkv all    no
22 lora    qkv all    yes
"

if [ -n "${MODEL:-}" ]; then
    DEMO=0
    [ -d "$MODEL" ] || fail "MODEL=$MODEL: no such directory (expected a ChatGLM-6B checkpoint directory)"
    [ -f "$MODEL/config.json" ] \
        || fail "MODEL=$MODEL: no config.json in it (expected a ChatGLM-6B checkpoint directory)"
    # json only, no torch: the dry run needs nothing but a Python
    DEPTH=$("${PY:-python3}" -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["num_layers"]))' \
        "$MODEL/config.json" 2>/dev/null) || fail "$MODEL/config.json: no num_layers (expected a ChatGLM config)"
    DATA_DIR="${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo data/demo)}"
    PARALLEL="${PARALLEL:-1}"
    # The study's settings are train.py's defaults (lr 1e-5, 10 epochs, cosine, batch 8, bf16); 200 training
    # records are held out for a validation loss every 500 steps (trainer_log.jsonl, train_results.json).
    TRAIN_ARGS="--save-minutes 30 --val-size 200 --eval-steps 500"
    EVAL_ARGS=""
else
    DEMO=1
    DEPTH=6  # model/chatglm.py PRESETS["tiny"]["num_layers"] (tests/test_launch.py checks it)
    MODEL="$RUNS/base-model"
    DATA_DIR="${DATA_DIR:-data/demo}"
    PARALLEL="${PARALLEL:-2}"
    # The tiny model learns in minutes only with larger steps than the 6B study's 1e-5. A validation loss on
    # 100 held-out training records every 50 of the ~240 steps.
    TRAIN_ARGS="--lr 2e-3 --epochs 2 --batch-size 16 --precision fp32 --logging-steps 20 --save-steps 0
        --save-minutes 2 --val-size 100 --eval-steps 50"
    EVAL_ARGS="--batch-size 100 --precision fp32"
    BASE_TRAIN="--model tiny --method full --dataset alpaca_gpt4_zh,chat_aux_zh --dataset-dir $DATA_DIR
        --lr 3e-3 --epochs 12 --batch-size 16 --precision fp32 --warmup-steps 50 --logging-steps 50 --save-steps 0
        --save-minutes 2 --output-dir $RUNS/base-train ${TRAIN_EXTRA:-}"
fi
TRAIN_ARGS=$(echo $TRAIN_ARGS ${TRAIN_EXTRA:-})
EVAL_ARGS=$(echo $EVAL_ARGS ${EVAL_EXTRA:-})

launcher() {  # $1 = number of processes
    if [ "$1" -gt 1 ]; then echo "$PY -m torch.distributed.run --nproc_per_node $1"; else echo "$PY"; fi
}

layers_of() {  # grid name -> explicit layer range for this model's depth
    case "$1" in
        last3) echo "$((DEPTH - 3))-$((DEPTH - 1))" ;;
        first3) echo "0-2" ;;
        all) echo "0-$((DEPTH - 1))" ;;
        -) echo "-" ;;
    esac
}

# run_commands ID METHOD TARGET LAYERS AUX SEED -> sets NAME, DIR, TRAIN_CMD, EVAL_CMD
run_commands() {
    local id=$1 method=$2 target=$3 layers=$4 aux=$5 seed=$6 data="roleplay_all_train" extra=""
    NAME="$id-$method"
    [ "$target" != - ] && NAME="$NAME-$target-$layers"
    [ "$aux" = yes ] && NAME="$NAME-aux" && data="roleplay_all_train,chat_aux_zh" && extra=" --max-samples 10000"
    [ "$seed" != 42 ] && NAME="$NAME-seed$seed" && extra="$extra --seed $seed"  # 42: train.py's default
    DIR="$RUNS/$NAME"
    local run; run=$(launcher "$NPROC")
    TRAIN_CMD=""
    if [ "$method" != base ]; then
        TRAIN_CMD="$run train.py --model $MODEL --method $method"
        [ "$target" != - ] && TRAIN_CMD="$TRAIN_CMD --target $target --layers $layers"
        TRAIN_CMD="$TRAIN_CMD --dataset $data --dataset-dir $DATA_DIR$extra --output-dir $DIR"
        TRAIN_CMD="$TRAIN_CMD${TRAIN_ARGS:+ $TRAIN_ARGS}"
    fi
    EVAL_CMD="$run evaluate.py --model $MODEL$([ "$method" != base ] && echo " --checkpoint $DIR")"
    EVAL_CMD="$EVAL_CMD --dataset $EVAL_SETS --dataset-dir $DATA_DIR --max-samples 100 --output-dir $DIR/eval"
    [ "$seed" != 42 ] && EVAL_CMD="$EVAL_CMD --seed $seed"
    EVAL_CMD="$EVAL_CMD${EVAL_ARGS:+ $EVAL_ARGS}"
}

write_run_json() {  # DIR ID METHOD TARGET LAYERS AUX SEED TRAIN_CMD EVAL_CMD
    mkdir -p "$1"
    $PY - "$@" <<'EOF'
import json, sys
d, i, method, target, layers, aux, seed, train_cmd, eval_cmd = sys.argv[1:]
run = {"id": int(i), "name": d.rstrip("/").split("/")[-1], "method": method if method != "base" else "none",
       "target": target, "layers": layers, "aux": aux == "yes", "seed": int(seed),
       "commands": [c for c in (train_cmd, eval_cmd) if c]}
with open(f"{d}/run.json", "w", encoding="utf-8") as f:
    json.dump(run, f, indent=2)
    f.write("\n")
EOF
}

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

report() {  # NAME SECONDS|- MESSAGE...: the progress line of a finished row ("-": skipped, not in the ETA)
    local k ran secs eta=""
    {  # the lanes share the count: append and count under a lock
        flock 8
        echo "$2" >&8
        read -r k ran secs < <(awk '{k++} $1 != "-" {r++; s += $1} END {print k, r + 0, s + 0}' "$PROGRESS")
    } 8>>"$PROGRESS"
    [ "$ran" -gt 0 ] && [ "$k" -lt "$N" ] && eta=", ETA $(hms $((secs / ran * (N - k) / PARALLEL)))"
    echo "[launch] run $k/$N $1: ${*:3} (elapsed $(hms $(($(date +%s) - START)))$eta)"
}

# one run, as its fingerprint says: train (resuming) and evaluate, evaluate again, or skip; $1 = grid row
do_run() {
    read -r id method target grid_layers aux seed <<<"$1"
    run_commands "$id" "$method" "$target" "$(layers_of "$grid_layers")" "$aux" "$seed"
    if [ "$DRY" = 1 ]; then
        echo "# $id: $NAME"
        [ -n "$TRAIN_CMD" ] && echo "$TRAIN_CMD"
        echo "$EVAL_CMD"
        return 0
    fi
    local what t0
    what=$($PY -m fingerprint "$DIR" $RERUN) \
        || { echo "[launch] $NAME: python -m fingerprint $DIR failed" >&2; return 1; }
    [ "$what" = train ] && [ -z "$TRAIN_CMD" ] && what=eval  # the base row (no run.json yet) is evaluation only
    case "$what" in
        done) report "$NAME" - "finished, skipped"; return 0 ;;
        stale) report "$NAME" - "finished, but by other code (the table marks it; bash launch.sh --rerun-stale" \
            "redoes it), skipped"; return 0 ;;
    esac
    t0=$(date +%s)
    write_run_json "$DIR" "$id" "$method" "$target" "$(layers_of "$grid_layers")" "$aux" "$seed" "$TRAIN_CMD" \
        "$EVAL_CMD"
    if [ "$what" = train ]; then
        # a run finished by other code starts over; anything else continues from its latest checkpoint
        local mode=--resume again=""
        [ -f "$DIR/train_results.json" ] && mode=--overwrite again=" again (finished by other code)"
        echo "[launch] $NAME: training$again, log $DIR/train.log"
        attempt "$DIR/train.log" $TRAIN_CMD $mode || {
            report "$NAME" $(($(date +%s) - t0)) "training failed, see $DIR/train.log" >&2; return 1; }
    fi
    echo "[launch] $NAME: evaluating, log $DIR/eval.log"
    attempt "$DIR/eval.log" $EVAL_CMD || {
        report "$NAME" $(($(date +%s) - t0)) "evaluation failed, see $DIR/eval.log" >&2; return 1; }
    report "$NAME" $(($(date +%s) - t0)) "done in $(hms $(($(date +%s) - t0)))"
}

lane() {  # $1 = lane index: runs every PARALLEL-th selected row on its own GPUs / CPU thread
    local k=0 status=0
    if [ "$GPUS" -gt 0 ]; then
        export CUDA_VISIBLE_DEVICES=$(seq -s, $(($1 * NPROC)) $(($1 * NPROC + NPROC - 1)))
    elif [ "$PARALLEL" -gt 1 ]; then
        export OMP_NUM_THREADS=1
    fi
    while read -r row; do
        [ -z "$row" ] && continue
        [ $((k % PARALLEL)) -eq "$1" ] && { do_run "$row" || status=1; }
        k=$((k + 1))
    done <<<"$ROWS"
    return $status
}

# the chosen grid rows, each once per seed (seed after row: the seeds of a row run side by side)
ROWS=$(echo "$GRID" | awk -v ids=" ${IDS[*]:-} " -v seeds="$SEEDS" \
    'NF && (ids == "  " || index(ids, " " $1 " ")) {for (s = 0; s < seeds; s++) print $0, 42 + s}')
N=$(echo "$ROWS" | wc -l)

if [ "$DRY" = 1 ]; then
    PY="${PY:-python3}"
    if [ "$DEMO" = 1 ]; then
        echo "# base model for the demo: tiny ChatGLM trained on the general-knowledge data"
        echo $PY train.py $BASE_TRAIN
        echo $PY -m adapters --model tiny --checkpoint $RUNS/base-train --output $MODEL
    fi
    PARALLEL=1 lane 0
    exit 0
fi

# One launcher per RUNS. The lock is held as long as this shell or any run it started lives.
mkdir -p "$RUNS"
exec 9>>"$RUNS/launch.lock"
flock -n 9 || { echo "launch.sh: $RUNS is in use by another launcher ($(cat "$RUNS/launch.holder" 2>/dev/null));" \
    "wait for it or stop it" >&2; exit 1; }
echo "$HOLDER" >"$RUNS/launch.holder"
PROGRESS="$RUNS/launch.progress"
: >"$PROGRESS"
START=$(date +%s)

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
    flock -w 10 "$RUNS/launch.lock" true \
        || for pid in "${GROUPS_RUNNING[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    printf '\n[launch] interrupted: the runs stopped; the same command resumes them (checkpoints are kept)\n' >&2
    exit 130
}
trap interrupted INT TERM HUP

[ -n "${PY:-}" ] || source scripts/env.sh

base_model() {  # the demo's base model with its progress bar on screen, resuming an interrupted training
    header "$RUNS/base-train.log" $PY train.py $BASE_TRAIN --resume
    $PY train.py $BASE_TRAIN --resume 2>&1 | tee -a "$RUNS/base-train.log"
}
if [ "$DEMO" = 1 ] && [ ! -f "$MODEL/config.json" ]; then
    echo "[launch] training the demo's base model (tiny ChatGLM on the bundled general-knowledge data)"
    in_group base_model
    wait $! && [ -f "$RUNS/base-train/train_results.json" ] \
        || { echo "[launch] base training failed: $RUNS/base-train.log" >&2; exit 1; }
    $PY -m adapters --model tiny --checkpoint "$RUNS/base-train" --output "$MODEL"
fi

lanes=()
for ((i = 0; i < PARALLEL; i++)); do in_group lane "$i"; lanes+=($!); done
status=0
for pid in "${lanes[@]}"; do wait "$pid" || status=1; done

$PY evaluate.py --runs "$RUNS"
exit $status
