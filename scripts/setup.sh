#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv at .venv and installs fwjax with extras.
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh dev,notebooks (default dev,data)
# Prints one line when it installs; pip's output goes to .venv/pip-install.log (shown on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,data}"
python="${PYTHON:-python3}"
log=".venv/pip-install.log"

quiet() {  # runs a command with its output in $log; prints the log if it fails
  if ! "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "fwjax setup: '$*' failed (log: $log)" >&2
    exit 1
  fi
}

if [[ ! -x .venv/bin/python ]]; then
  echo "fwjax setup: creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
  : >"$log"
  quiet .venv/bin/python -m pip install --upgrade pip "setuptools>=77"  # the wheel test builds without isolation
fi
# Reinstall only when pyproject.toml changed since an install that covered every requested extra.
IFS=, read -ra wanted <<<"$extras"
for stamp in .venv/.fwjax-installed-*; do
  [[ -f "$stamp" && ! pyproject.toml -nt "$stamp" ]] || continue
  have="_${stamp#.venv/.fwjax-installed-}_"
  missing=0
  for extra in "${wanted[@]}"; do
    [[ "$have" == *"_${extra}_"* ]] || missing=1
  done
  ((missing)) || exit 0
done
echo "fwjax setup: installing fwjax[$extras] into .venv (pip's output: $log)"
: >"$log"
quiet .venv/bin/python -m pip install -e ".[${extras}]"
touch ".venv/.fwjax-installed-${extras//,/_}"
