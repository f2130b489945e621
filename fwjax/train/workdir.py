"""The files of a training workdir, and the rules that keep them consistent with the run.

A workdir holds one run: ``config.json`` (the resolved config), ``checkpoints/``, ``corrupt/``
(checkpoints that could not be read, set aside), ``metrics.jsonl``, ``summary.json``,
``tokenizer.json`` (language models), ``tb/`` (TensorBoard) and ``wandb/`` + ``wandb_run_id``
(Weights & Biases). A run started in a workdir
whose stored config differs in anything that shapes the trained model (model, data, optimizer,
seed, batch) is refused before any file is touched; keys that only change how the run is
executed (:data:`RUNTIME_KEYS`, e.g. ``steps`` to extend a run, logging, checkpointing, the mesh)
may change and the change is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fwjax.train.config import TrainConfig
from fwjax.train.config_io import apply_overrides, structure, unstructure, upgrade_stored

log = logging.getLogger(__name__)

# Top-level keys (or sections, with a trailing dot) that may differ between the stored config
# and a resumed run: they do not change which model is trained.
RUNTIME_KEYS = (
    "steps",
    "eval_every",
    "eval_batches",
    "log_every",
    "nonfinite",
    "max_consecutive_nonfinite",
    "progress_bar",
    "tensorboard",
    "wandb",
    "wandb_project",
    "wandb_name",
    "wandb_mode",
    "checkpoint.",
    "mesh.",
    "distributed.",
)

# What ``--overwrite`` removes: everything a run writes into its workdir.
RUN_FILES = (
    "checkpoints",
    "corrupt",
    "tb",
    "wandb",
    "wandb_run_id",
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "tokenizer.json",
)


class WorkdirError(ValueError):
    """The workdir holds a run that the requested run must not touch (a user error)."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}`` (lists stay values).

    Args:
      tree: nested dicts of JSON values.
      prefix: prepended to every key (with a dot).

    Returns:
      A flat dict of dotted keys.
    """
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _is_runtime(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUNTIME_KEYS)


def stored_config(workdir: Path) -> TrainConfig | None:
    """The config in ``workdir/config.json``, or None when there is none.

    Raises:
      WorkdirError: the file exists but is not a valid config.
    """
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        return read_config(workdir)
    except (ValueError, TypeError) as e:
        raise WorkdirError(f"{str(path)!r} is not a valid fwjax config ({e})") from e


def read_config(workdir: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config stored in ``workdir/config.json`` (fields it predates filled by
    :func:`~fwjax.train.config_io.upgrade_stored`), with ``key.path=value`` overrides.

    Args:
      workdir: a training workdir.
      overrides: ``key.path=value`` strings (TOML literals), applied before validation.

    Returns:
      The validated config.

    Raises:
      FileNotFoundError: ``workdir`` holds no config (it is not a training workdir).
      ValueError / TypeError: the stored config or an override is invalid (naming the key).
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: is {str(workdir)!r} a training workdir?")
    stored = upgrade_stored(json.loads(path.read_text()))
    return structure(TrainConfig, apply_overrides(stored, list(overrides)))


def config_differences(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` of every key that differs."""
    a, b = flatten(unstructure(old)), flatten(unstructure(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_config(workdir: Path, old: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    """Refuses a run whose config differs from the workdir's in more than runtime keys.

    Args:
      workdir: the run's directory (for the message).
      old: the stored config.
      new: the requested config.

    Returns:
      The runtime keys that differ, ``{key: (old, new)}`` (to be recorded).

    Raises:
      WorkdirError: naming every key that differs and the two ways on.
    """
    diff = config_differences(old, new)
    fixed = {k: v for k, v in diff.items() if not _is_runtime(k)}
    if fixed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items())
        raise WorkdirError(
            f"workdir {str(workdir)!r} holds a run with a different config ({shown}); use "
            f"another --workdir, or --overwrite to delete the old run and start afresh"
        )
    return diff


def remove_run(workdir: Path) -> list[str]:
    """Deletes the files of a run (:data:`RUN_FILES`) from ``workdir``; returns their names."""
    removed = []
    for name in RUN_FILES:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_config(workdir: Path, config: TrainConfig) -> None:
    """Writes ``workdir/config.json`` unless it already holds exactly this config."""
    path = workdir / "config.json"
    text = json.dumps(unstructure(config), indent=2)
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)


def read_summary(workdir: Path) -> dict | None:
    """``workdir/summary.json``, or None when it is missing or unreadable."""
    path = workdir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary_line(summary: dict, steps: int) -> str:
    """The line ``fwjax train`` ends with: steps, time and the final evaluation.

    Args:
      summary: a run's summary (``steps``, ``seconds``, ``eval``).
      steps: the configured number of steps.

    Returns:
      ``"fwjax train: step S/N in X s; eval loss=... accuracy=..."``.
    """
    evals = " ".join(f"{k}={v:.4g}" for k, v in summary.get("eval", {}).items())
    return (
        f"fwjax train: step {summary['steps']}/{steps} in {summary['seconds']:.1f} s; eval {evals}"
    )
