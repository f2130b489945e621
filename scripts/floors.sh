#!/usr/bin/env bash
# The floors job: installs the OLDEST versions pyproject.toml allows for fwjax's direct dependencies
# (uv's --resolution lowest-direct) into a separate venv and runs a smoke subset of the tests on them.
# Slow (it downloads old jax/flax wheels), so it is not part of scripts/test.sh; run it when changing
# a floor or a call into a dependency:  bash scripts/floors.sh [venv-dir]   (default .venv-floors)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-floors}"
python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/uv" ]]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q uv
fi
uv=("$venv/bin/uv" pip install -q --python "$venv/bin/python")
# Test tools at their current versions first; then fwjax with its core and data dependencies at
# their floors (lowest-direct: direct dependencies at the oldest allowed version, the rest newest
# compatible).
"${uv[@]}" pytest pytest-xdist hypothesis typeguard tensorboardX "setuptools>=77"
"${uv[@]}" --resolution lowest-direct -e ".[data]"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
names = ["jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "tqdm",
         "jaxtyping", "safetensors", "tensorflow-datasets", "grain", "importlib_resources"]
print("floors job:", ", ".join(f"{n} {version(n)}" for n in names))
PY
# The smoke subset: every op against the oracle (float32/float64), the layers, one training run
# with checkpoint and resume, the CLI, the data pipelines, the wheel.
"$venv/bin/python" -m pytest -q -x -n 2 -p no:cacheprovider -m "not slow and not gpu and not tpu" \
  tests/ops/test_parity.py tests/nn/test_layers.py tests/train/test_train.py \
  tests/train/test_cli.py tests/data tests/test_packaging.py "$@"
