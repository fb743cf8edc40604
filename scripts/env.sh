# Sourced by launch.sh and tests/run.sh: sets PY to the Python of .venv/ here, building it once.
# .venv/ holds the requirements (CPU torch first where no GPU is visible, so pip never pulls a multi-GB CUDA
# build by accident); where the system python3 already has them, .venv/ reuses them (--system-site-packages).
# Either way `source .venv/bin/activate` then gives the README's commands their `python` and `torchrun`.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_need='import torch, sentencepiece, numpy, jieba, rouge_chinese, nltk, safetensors, tqdm, matplotlib, pytest'
if [ ! -x "$REPO/.venv/bin/python" ]; then
    echo "[env] creating $REPO/.venv" >&2
    _site=$(python3 -c "$_need" 2>/dev/null && echo --system-site-packages || true)
    python3 -m venv $_site "$REPO/.venv" || { echo "[env] python3 -m venv failed: install python3-venv" >&2; exit 1; }
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
if [ ! -e "$REPO/.venv/bin/torchrun" ]; then  # torch from the system site: no console script in .venv
    printf '#!/bin/sh\nexec "%s" -m torch.distributed.run "$@"\n' "$PY" > "$REPO/.venv/bin/torchrun"
    chmod +x "$REPO/.venv/bin/torchrun"
fi
export PY
