#!/usr/bin/env bash
# The GPU device plan in one call of at most 8 minutes (benchmarks/README.md, "Mosaic GPU
# kernels"), from the repo root, with the device machine's python3:
#   1. versions and the GPU;
#   2. the compiled GPU tests of the Mosaic GPU and Pallas kernels (pytest -m gpu), 150 s at most;
#   3. gpu_bench with per-kernel profiles (--profile): the compiled parity rows, then fwjax's
#      PALLAS (default and phased: Triton, Mosaic GPU, Mosaic GPU with the affine chain) beside
#      fla's chunk_delta_rule at B2 T8192 H8 D64 and B4 T4096 H16 D128, fwd+bwd and fwd, until
#      the deadline (300 s; every result is written as it finishes).
# fla runs from a wheel carried in .whl/ (pip download --no-deps fla-core -d .whl here, then
# carry .whl); without one its jobs fail and the others still run. Results in $OUT.
#   ONLY=...       replaces step 3's job filter (gpu_bench --only, comma-separated substrings)
#   DEADLINE=...   step 3's seconds
#   PYTHON=...     the interpreter (python3)
# CPU dry run (interpreter, tiny shapes): bash benchmarks/device_plan.sh --cpu-smoke
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_plan}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
shapes="B2T8192H8D64 B4T4096H16D128"
impls="fwjax_pallas fla_chunk fwjax_pallas_phased fwjax_pallas_phased_mgpu fwjax_pallas_phased_mgpu_affine"
only=""
for s in $shapes; do for i in $impls; do only="$only${only:+,}$i|$s"; done; done
ONLY=${ONLY:-$only}

echo "== 1. versions"
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || echo "(no torch/triton)"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader || true

if [ "${1:-}" = "--cpu-smoke" ]; then
  echo "== 2. (skipped on CPU: the gpu tests need JAX_PLATFORMS=cuda)"
  echo "== 3. gpu_bench --cpu-smoke --profile"
  PYTHONPATH=. "$PY" benchmarks/gpu_bench.py --cpu-smoke --profile --out "$OUT" \
    --only "fwjax_pallas|,fwjax_pallas_phased_mgpu|" --deadline "${DEADLINE:-300}"
  exit $?
fi

echo "== 2. compiled GPU tests"
timeout 150 env JAX_PLATFORMS=cuda "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/ops/test_mosaic_gpu.py tests/ops/test_pallas.py > "$OUT/gpu_tests.txt" 2>&1
echo "rc=$? (124: timed out)"
tail -n 40 "$OUT/gpu_tests.txt"

echo "== 3. gpu_bench --profile"
bash benchmarks/gpu_bench.sh --profile --only "$ONLY" --deadline "${DEADLINE:-300}" --timeout 100
