#!/usr/bin/env bash
# The study's grid (../shared/docs/experiment.md): id 0 = the base model, ids 1-22 = method x target x
# layers x auxiliary set; each run is trained, then evaluated on the role-play test split and on
# alpaca-gpt4-zh (100 samples each); then the comparison table is printed.
#
#   bash launch.sh                 # every id; finished runs are skipped
#   bash launch.sh 14 17           # chosen ids
#   bash launch.sh --dry-run [ids] # print the commands, run nothing
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
set -euo pipefail
cd "$(dirname "$0")"

DRY=0
IDS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        ''|*[!0-9]*) echo "launch.sh: unknown argument '$arg' (ids are 0-22; --dry-run)" >&2; exit 2 ;;
        *) IDS+=("$arg") ;;
    esac
done

if [ "$DRY" = 1 ]; then PY="${PY:-python3}"; else source scripts/env.sh; fi
RUNS="${RUNS:-runs}"
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
    DATA_DIR="${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo data/demo)}"
    PARALLEL="${PARALLEL:-1}"
    # The study's settings are train.py's defaults (lr 1e-5, 10 epochs, cosine, batch 8, bf16).
    TRAIN_ARGS=""
    EVAL_ARGS=""
else
    DEMO=1
    MODEL="$RUNS/base-model"
    DATA_DIR="${DATA_DIR:-data/demo}"
    PARALLEL="${PARALLEL:-2}"
    # The tiny model learns in minutes only with larger steps than the 6B study's 1e-5.
    TRAIN_ARGS="--lr 2e-3 --epochs 2 --batch-size 16 --precision fp32 --logging-steps 20 --save-steps 0"
    EVAL_ARGS="--batch-size 100 --precision fp32"
    BASE_TRAIN="--model tiny --method full --dataset alpaca_gpt4_zh,chat_aux_zh --dataset-dir $DATA_DIR
        --lr 3e-3 --epochs 12 --batch-size 16 --precision fp32 --warmup-steps 50 --logging-steps 50 --save-steps 0"
fi

launcher() {  # $1 = number of processes
    if [ "$1" -gt 1 ]; then echo "$PY -m torch.distributed.run --nproc_per_node $1"; else echo "$PY"; fi
}

depth() {
    if [ "$DEMO" = 1 ]; then
        $PY -c 'from model import ChatGLMConfig; print(ChatGLMConfig.from_name("tiny").num_layers)'
    else
        $PY -c 'import sys; from model import ChatGLMConfig; print(ChatGLMConfig.from_json(sys.argv[1]).num_layers)' \
            "$MODEL/config.json"
    fi
}
DEPTH=$(depth)

layers_of() {  # grid name -> explicit layer range for this model's depth
    case "$1" in
        last3) echo "$((DEPTH - 3))-$((DEPTH - 1))" ;;
        first3) echo "0-2" ;;
        all) echo "0-$((DEPTH - 1))" ;;
        -) echo "-" ;;
    esac
}

# run_commands ID METHOD TARGET LAYERS AUX -> sets NAME, DIR, TRAIN_CMD, EVAL_CMD
run_commands() {
    local id=$1 method=$2 target=$3 layers=$4 aux=$5 data="roleplay_all_train" extra=""
    NAME="$id-$method"
    [ "$target" != - ] && NAME="$NAME-$target-$layers"
    [ "$aux" = yes ] && NAME="$NAME-aux" && data="roleplay_all_train,chat_aux_zh" && extra=" --max-samples 10000"
    DIR="$RUNS/$NAME"
    local run; run=$(launcher "$NPROC")
    TRAIN_CMD=""
    if [ "$method" != base ]; then
        TRAIN_CMD="$run train.py --model $MODEL --method $method"
        [ "$target" != - ] && TRAIN_CMD="$TRAIN_CMD --target $target --layers $layers"
        TRAIN_CMD="$TRAIN_CMD --dataset $data --dataset-dir $DATA_DIR$extra --output-dir $DIR $TRAIN_ARGS"
    fi
    EVAL_CMD="$run evaluate.py --model $MODEL$([ "$method" != base ] && echo " --checkpoint $DIR")"
    EVAL_CMD="$EVAL_CMD --dataset $EVAL_SETS --dataset-dir $DATA_DIR --max-samples 100 --output-dir $DIR/eval $EVAL_ARGS"
    EVAL_CMD="${EVAL_CMD% }"
    TRAIN_CMD="${TRAIN_CMD% }"
}

finished() {  # a run is finished when both evaluation sets have metrics
    [ -f "$1/eval/roleplay_all_test/metrics.json" ] && [ -f "$1/eval/alpaca_gpt4_zh/metrics.json" ]
}

write_run_json() {  # DIR ID METHOD TARGET LAYERS AUX TRAIN_CMD EVAL_CMD
    mkdir -p "$1"
    $PY - "$@" <<'EOF'
import json, sys
d, i, method, target, layers, aux, train_cmd, eval_cmd = sys.argv[1:]
run = {"id": int(i), "name": d.rstrip("/").split("/")[-1], "method": method if method != "base" else "none",
       "target": target, "layers": layers, "aux": aux == "yes",
       "commands": [c for c in (train_cmd, eval_cmd) if c]}
with open(f"{d}/run.json", "w", encoding="utf-8") as f:
    json.dump(run, f, indent=2)
    f.write("\n")
EOF
}

# one run: train (unless done), then evaluate; $1 = grid row, $2 = lane (GPU group)
do_run() {
    read -r id method target grid_layers aux <<<"$1"
    run_commands "$id" "$method" "$target" "$(layers_of "$grid_layers")" "$aux"
    if [ "$DRY" = 1 ]; then
        echo "# $id: $NAME"
        [ -n "$TRAIN_CMD" ] && echo "$TRAIN_CMD"
        echo "$EVAL_CMD"
        return 0
    fi
    if finished "$DIR"; then echo "[launch] $NAME: finished, skipped"; return 0; fi
    write_run_json "$DIR" "$id" "$method" "$target" "$(layers_of "$grid_layers")" "$aux" "$TRAIN_CMD" "$EVAL_CMD"
    echo "[launch] $NAME: started $(date +%H:%M:%S)"
    if [ -n "$TRAIN_CMD" ] && [ ! -f "$DIR/train_results.json" ]; then
        $TRAIN_CMD --resume > "$DIR/train.log" 2>&1 || { echo "[launch] $NAME: training failed, see $DIR/train.log" >&2; return 1; }
    fi
    $EVAL_CMD > "$DIR/eval.log" 2>&1 || { echo "[launch] $NAME: evaluation failed, see $DIR/eval.log" >&2; return 1; }
    echo "[launch] $NAME: done $(date +%H:%M:%S)"
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

ROWS=$(echo "$GRID" | awk -v ids=" ${IDS[*]:-} " 'NF && (ids == "  " || index(ids, " " $1 " "))')

if [ "$DEMO" = 1 ]; then
    BASE_CMD="$PY train.py $BASE_TRAIN --output-dir $RUNS/base-train"
    EXPORT_CMD="$PY -m adapters --model tiny --checkpoint $RUNS/base-train --output $MODEL"
    if [ "$DRY" = 1 ]; then
        echo "# base model for the demo: tiny ChatGLM trained on the general-knowledge data"
        echo $BASE_CMD
        echo $EXPORT_CMD
    elif [ ! -f "$MODEL/config.json" ]; then
        echo "[launch] training the demo's base model (tiny ChatGLM on the bundled general-knowledge data)"
        mkdir -p "$RUNS/base-train"
        $BASE_CMD --resume 2>&1 | tee "$RUNS/base-train.log" | grep -E "train_loss|Error|error" || true
        [ -f "$RUNS/base-train/train_results.json" ] || { echo "[launch] base training failed: $RUNS/base-train.log" >&2; exit 1; }
        $EXPORT_CMD
    fi
fi

if [ "$DRY" = 1 ]; then
    PARALLEL=1 lane 0
    exit 0
fi
status=0
pids=()
for ((i = 0; i < PARALLEL; i++)); do lane "$i" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

$PY evaluate.py --runs "$RUNS"
exit $status
