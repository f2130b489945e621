#!/usr/bin/env bash
# The main job: sets up .venv, then trains a delta-rule fast weight memory on the paper's synthetic
# update task (no download; ~2-3 minutes on 2 CPU cores) and prints its evaluation.
# Re-running resumes the run in runs/retrieval_delta, or, when it is finished, prints its stored
# summary and evaluation again without changing a file. Extra arguments go to `fwjax train`,
# e.g. --set steps=5000 (extends the run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,data
workdir="${FWJAX_WORKDIR:-runs/retrieval_delta}"
.venv/bin/fwjax train --config retrieval_delta --workdir "$workdir" "$@"
exec .venv/bin/fwjax eval --workdir "$workdir"
