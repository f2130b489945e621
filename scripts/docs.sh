#!/usr/bin/env bash
# Builds the documentation site (docs/, mkdocs.yml) into site/ with warnings as errors: a
# docstring that does not parse, a broken link or include, or a missing page fails the build.
# Sets up .venv with the docs extra first when it lacks it (scripts/setup.sh).
# Extra arguments go to `mkdocs build`, e.g. --site-dir /tmp/site. mkdocs' log is shown only
# when the build fails (its --quiet would also hide the warnings that fail a strict build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh docs
if ! log=$(NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict "$@" 2>&1); then
  echo "$log" >&2
  echo "fwjax docs: mkdocs build --strict failed" >&2
  exit 1
fi
echo "fwjax docs: built site/index.html"
