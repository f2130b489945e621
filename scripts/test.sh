#!/usr/bin/env bash
# Sets up .venv, then runs ruff and the default test suite (everything not marked slow/gpu/tpu)
# on 2 worker processes. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -n 2 -m "not slow and not gpu and not tpu" "$@"
