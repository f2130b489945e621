"""Host-side metrics: a JSONL file (always), a tqdm progress bar, TensorBoard (optional).

Only process 0 writes. Each JSONL line is ``{"step": ..., "split": "train"|"eval"|"summary",
...metrics}``; a resumed run appends to the same file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


def _clean(value):
    if isinstance(value, list):
        return [_clean(v) for v in value]
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Writes metrics to ``workdir/metrics.jsonl`` (+ tensorboardX events under ``workdir/tb``)."""

    def __init__(self, workdir: Path, *, tensorboard: bool = False):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "tensorboard=true needs tensorboardX: pip install 'fwjax[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar over the run's steps (process 0, when enabled), showing loss and tokens/s."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
