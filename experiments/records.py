"""Per-point result files of the resumable experiment runners.

Each finished grid point is one JSON file; a runner skips the points whose file exists, so a file
must be either complete or absent, whatever kills the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, record: dict) -> None:
    """Writes ``record`` as indented JSON to ``path``, atomically.

    The text goes to a temporary sibling (named after this process, so concurrent workers never
    share one), which then replaces ``path`` in one rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
