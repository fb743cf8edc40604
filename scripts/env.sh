# Sourced by launch.sh and tests/run.sh: sets PY to a Python that has the requirements.
# Uses the current python3 when it already has them; otherwise builds .venv here once
# (CPU torch first where no GPU is visible, so pip never pulls a multi-GB CUDA build by accident).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_need='import torch, sentencepiece, numpy, jieba, rouge_chinese, nltk, safetensors, tqdm, matplotlib, pytest'
if python3 -c "$_need" 2>/dev/null; then
    PY=python3
else
    if [ ! -x "$REPO/.venv/bin/python" ]; then
        echo "[env] creating $REPO/.venv" >&2
        python3 -m venv "$REPO/.venv" || { echo "[env] python3 -m venv failed: install python3-venv" >&2; exit 1; }
    fi
    PY="$REPO/.venv/bin/python"
    if ! "$PY" -c "$_need" 2>/dev/null; then
        echo "[env] installing requirements into $REPO/.venv (one time)" >&2
        if ! "$PY" -c 'import torch' 2>/dev/null; then
            if command -v nvidia-smi >/dev/null 2>&1; then
                "$PY" -m pip install -q torch
            else
                "$PY" -m pip install -q torch==2.13.0
            fi
        fi
        "$PY" -m pip install -q -r "$REPO/requirements.txt" || { echo "[env] pip install failed" >&2; exit 1; }
    fi
fi
export PY
