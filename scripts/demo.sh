#!/usr/bin/env bash
# The main job: sets up .venv, then trains a delta-rule fast weight memory on the paper's synthetic
# update task (no download; ~2-3 minutes on 2 CPU cores) and prints its evaluation.
# Re-running resumes (or, when finished, just re-evaluates) the run in runs/retrieval_delta.
# Extra arguments go to `fwjax train`, e.g. --set steps=500.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
workdir="${FWJAX_WORKDIR:-runs/retrieval_delta}"
.venv/bin/fwjax train --config retrieval_delta --workdir "$workdir" "$@"
exec .venv/bin/fwjax eval --workdir "$workdir"
