#!/usr/bin/env bash
# GPU benchmark (benchmarks/gpu_bench.py), from the repo root, with $PYTHON (python3); flash-linear-attention from a carried wheel in .whl/ (if any).
set -u; rm -rf /tmp/fla_pkgs; for w in .whl/fla_core-*.whl; do [ -f "$w" ] && python3 -m zipfile -e "$w" /tmp/fla_pkgs; done; PYTHONPATH=.:/tmp/fla_pkgs${PYTHONPATH:+:$PYTHONPATH} "${PYTHON:-python3}" benchmarks/gpu_bench.py --out "${OUT:-.}" "$@"
