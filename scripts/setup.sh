#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv at .venv and installs fwjax with its dev extras.
# Usage: bash scripts/setup.sh [extra ...]   e.g. bash scripts/setup.sh dev,notebooks
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# Reinstall only when the requested extras or pyproject.toml changed since the last install.
stamp=".venv/.fwjax-installed-${extras//,/_}"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
