#!/usr/bin/env bash
# The GPU device plan in one call of at most 8 minutes (benchmarks/README.md, "Mosaic GPU
# kernels"), from the repo root, with the device machine's python3:
#   1. versions and the GPU;
#   2. the compiled GPU tests of the Mosaic GPU and Pallas kernels (pytest -m gpu), 120 s at most;
#   3. gpu_bench with per-kernel profiles (--profile): the compiled parity rows, then fla's
#      chunk_delta_rule beside fwjax's PALLAS (phased on Mosaic GPU, the default, phased on
#      Triton, Mosaic GPU with the affine chain) at B2 T8192 H8 D64, then at B4 T4096 H16
#      D128, fwd+bwd and fwd, until the deadline (320 s; every result is written as it
#      finishes).
# fla runs from a wheel carried in .whl/ (pip download --no-deps fla-core -d .whl here, with
# any pure-Python dependency the device lacks, then carry .whl); without one its jobs fail and
# the others still run. Results in $OUT (default /tmp/device_plan).
#   ONLY=...       replaces step 3's job filter (gpu_bench --only, comma-separated substrings)
#   DEADLINE=...   step 3's seconds
#   PYTHON=...     the interpreter (python3)
# CPU dry run (interpreter, tiny shapes): bash benchmarks/device_plan.sh --cpu-smoke
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/device_plan}
export PYTHON=${PYTHON:-python3}
PY=$PYTHON
mkdir -p "$OUT"
shapes="B2T8192H8D64 B4T4096H16D128"
# in this order (gpu_bench runs the --only jobs in the order of their substrings)
impls="fla_chunk fwjax_pallas_phased_mgpu fwjax_pallas fwjax_pallas_phased fwjax_pallas_phased_mgpu_affine"
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
  bash benchmarks/gpu_bench.sh --cpu-smoke --profile --out "$OUT" \
    --only "fwjax_pallas|,fwjax_pallas_phased_mgpu|" --deadline "${DEADLINE:-320}"
  exit $?
fi

echo "== 2. compiled GPU tests"
timeout -k 10 120 env JAX_PLATFORMS=cuda "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/ops/test_mosaic_gpu.py tests/ops/test_pallas.py > "$OUT/gpu_tests.txt" 2>&1
echo "rc=$? (124: timed out)"
tail -n 40 "$OUT/gpu_tests.txt"

echo "== 3. gpu_bench --profile"
bash benchmarks/gpu_bench.sh --profile --out "$OUT" --only "$ONLY" --deadline "${DEADLINE:-320}" \
  --timeout 100
