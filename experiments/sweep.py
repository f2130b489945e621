"""What every resumable sweep runner shares: one JSON file per finished point
(:func:`experiments.records.write_json_atomic`, written by the runner's ``run_point``), points
with a file skipped, the merged outputs rewritten after every point, one XLA thread per process,
and an optional pool of pinned worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import multiprocessing
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any


def limit_threads(cores: list[int] | None = None) -> None:
    """Confines this process's XLA to one thread (and, if given, to these cores). Set before
    JAX starts its backend (it reads ``XLA_FLAGS`` then)."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()
    )
    if cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def _worker_init(counter, n_cores: int, first_core: int) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    limit_threads([(first_core + index) % n_cores])


def load_records(
    folder: Path, sort_key: Callable[[dict], Any], defaults: dict | None = None
) -> list[dict]:
    """Every point file (``*.json``) of ``folder``, with ``defaults`` filled in for keys that
    older records lack, sorted by ``sort_key``."""
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    for record in records:
        for key, value in (defaults or {}).items():
            record.setdefault(key, value)
    return sorted(records, key=sort_key)


def write_csv(records: list[dict], path: Path, columns: Sequence[str]) -> None:
    """``records`` as CSV with ``columns`` (other keys dropped)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def run_points(
    points: Sequence[Hashable],
    run: Callable[[Any], dict],
    *,
    path: Callable[[Any], Path],
    write_outputs: Callable[[], list[dict]],
    describe: Callable[[Any, dict], str],
    workers: int = 1,
    first_core: int = 0,
    log: Callable[..., None] = print,
    label: str = "",
) -> list[dict]:
    """Runs the points whose file ``path(point)`` is missing; rewrites the outputs after each.

    Args:
      points: the sweep's points.
      run: ``run(point) -> record``; trains the point and writes its file. With ``workers > 1``
        it must be picklable (a module-level function or a ``functools.partial`` of one).
      path: a point's JSON file.
      write_outputs: merges the point files into the sweep's outputs; returns the records.
      describe: the progress line of a finished point.
      workers: 1 runs in this process; more runs a pool of spawned processes, worker ``i``
        pinned to core ``(first_core + i) % cpu_count`` with one XLA thread.
      first_core: see ``workers``.
      log: progress printer (called with ``flush=True``).
      label: prefix of the first progress line.

    Returns:
      Every finished record (before or now), as ``write_outputs`` returns them.
    """
    if workers < 1:
        raise ValueError(f"{workers=} must be >= 1")
    todo = [p for p in points if not path(p).exists()]
    log(
        f"{label}{len(points) - len(todo)} of {len(points)} points done, {len(todo)} to run "
        f"with {workers} worker(s)",
        flush=True,
    )

    def done(point, record):
        log(describe(point, record), flush=True)
        write_outputs()

    if workers == 1:
        for p in todo:
            done(p, run(p))
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork after JAX has started threads
        counter = ctx.Value("i", 0)
        with cf.ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(counter, os.cpu_count() or 1, first_core),
        ) as pool:
            futures = {pool.submit(run, p): p for p in todo}
            for fut in cf.as_completed(futures):
                done(futures[fut], fut.result())
    return write_outputs()
