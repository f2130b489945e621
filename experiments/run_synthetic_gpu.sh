#!/usr/bin/env bash
# Runs the full synthetic grids (experiments/synthetic.py) on a one-GPU machine with many cores:
# both settings at once, each a pool of spawned workers sharing the GPU, until a deadline; then
# archives the per-point records (the runner is resumable, so a later run continues).
#
#   DEADLINE=450 W1=10 W2=5 OUT=/tmp/out bash experiments/run_synthetic_gpu.sh
#
# fp32 matmuls at full precision (no TF32), so GPU points are comparable with CPU ones; every
# record names its device. Carried wheels in .whl/ (flax, optax) pin the library versions.
set -u
OUT=${OUT:-.}
DEADLINE=${DEADLINE:-450}
W1=${W1:-10}
W2=${W2:-5}
if compgen -G ".whl/flax-*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/flax-*.whl .whl/optax-*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" || exit 1
# Smoke: one tiny point end to end on the GPU before the grids.
python3 - <<'PY' || exit 1
import time
from experiments import synthetic
from fwjax.train.retrieval import RetrievalProtocol, train_retrieval
for fm, rule in (("dpfp1", "delta"), ("favor64", "sum"), ("softmax", "sum")):
    p = synthetic.GridPoint(2, fm, rule, 8)
    t = time.perf_counter()
    r = train_retrieval(p.task(), p.model_config(), RetrievalProtocol(max_steps=200))
    print(p.name, r.final_eval_loss, r.steps, f"{time.perf_counter() - t:.1f} s")
PY
start=$(date +%s)
timeout -k 5 "$DEADLINE" python3 -m experiments.synthetic --setting 2 --grid full \
  --workers "$W2" --first-core 0 > "$OUT/setting2.log" 2>&1 &
timeout -k 5 "$DEADLINE" python3 -m experiments.synthetic --setting 1 --grid full \
  --workers "$W1" --first-core "$W2" > "$OUT/setting1.log" 2>&1 &
wait
echo "grids ran $(( $(date +%s) - start )) s"
tail -n 3 "$OUT/setting2.log" "$OUT/setting1.log"
tar czf "$OUT/synthetic_points.tgz" experiments/results/synthetic
ls experiments/results/synthetic/setting1 | wc -l; ls experiments/results/synthetic/setting2 | wc -l
