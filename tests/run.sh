#!/usr/bin/env bash
# The test command of the README: sets up the environment if needed, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$PY" -m pytest -q tests "$@"
