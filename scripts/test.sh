#!/usr/bin/env bash
# Sets up .venv, then runs ruff, the default test suite (everything not marked slow/gpu/tpu) on 2
# worker processes, every notebook headless in its fast mode, and the documentation build
# (mkdocs --strict). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,notebooks,data,docs
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -n 2 --dist worksteal --durations=20 -m "not slow and not gpu and not tpu" "$@"
FWJAX_NOTEBOOK_FAST=1 .venv/bin/python -m pytest -p no:cacheprovider --nbmake notebooks/*.ipynb
bash scripts/docs.sh
