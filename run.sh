#!/usr/bin/env bash
# One-command set-up and run on a fresh machine (README):
#   bash run.sh tests   install, then run the test suite (CPU: kernels through Triton's interpreter)
#   bash run.sh main    install, then run the benchmarks and the demos on whatever hardware is present
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
  # torch first and pinned: on a CPU-only machine 2.13.0 is the local CPU build, while an unpinned torch
  # would pull gigabytes of CUDA packages. An installed torch is kept.
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
  fi
  "$PY" -m pip install -q -e ".[$1]"
}

case "${1:-}" in
  tests)
    install test
    "$PY" -m pytest -q tests
    ;;
  main)
    install bench
    "$PY" examples/quickstart.py
    # bench/results/ keeps the recorded H100 runs. A benchmark whose optional dependencies are missing is skipped
    # (not a failure); a failed one still lets the demo run, and the exit status reports it at the end.
    status=0
    "$PY" bench/run_all.py --out "${OUT:-bench/out}" || status=$?
    if [ -f examples/serve_multi_lora.py ]; then "$PY" examples/serve_multi_lora.py; fi
    exit "$status"
    ;;
  *)
    echo "usage: bash run.sh tests|main" >&2
    exit 2
    ;;
esac
