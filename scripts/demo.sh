#!/usr/bin/env bash
# The main job: sets up .venv, then runs the fast weight memory demo on the pure ops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m experiments.ops_demo "$@"
