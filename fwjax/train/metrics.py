"""Host-side metrics: a JSONL file (always), a tqdm progress bar, TensorBoard and Weights &
Biases (optional).

Only process 0 writes. Each JSONL line is ``{"step": ..., "split": "train"|"eval"|"summary",
...metrics}``; a resumed run first drops the records after its restored step (written by the
interrupted run after its last checkpoint), then appends: every step is logged once.

Without a progress bar (``progress_bar = false``, or stderr is not a terminal), a one-line log
(step, loss, tokens/s, elapsed time and ETA) goes to stderr at the first logged step and then at
most every ``interval_s`` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jax


def _clean(value):
    if isinstance(value, list):
        return [_clean(v) for v in value]
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


@dataclasses.dataclass(frozen=True)
class WandbOptions:
    """A Weights & Biases run (arguments of ``wandb.init``).

    Attributes:
      project: the W&B project.
      name: the run's display name (None: W&B picks one).
      mode: ``online``, ``offline`` or ``disabled`` (None: W&B's default or ``WANDB_MODE``).
      config: the run's configuration (JSON-ready), shown beside its metrics.
    """

    project: str = "fwjax"
    name: str | None = None
    mode: str | None = None
    config: dict[str, Any] | None = None


WANDB_ID_FILE = "wandb_run_id"  # the workdir's W&B run id, so that a resumed run continues it


def _start_wandb(workdir: Path, options: WandbOptions):
    """``wandb.init`` for the run in ``workdir``: files under ``workdir/wandb`` unless
    ``WANDB_DIR`` is set; the run id is kept in ``workdir/wandb_run_id`` and reused on resume."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb=true needs wandb: pip install 'fwjax[wandb]'") from e
    workdir.mkdir(parents=True, exist_ok=True)
    id_path = workdir / WANDB_ID_FILE
    run_id = id_path.read_text().strip() if id_path.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        id_path.write_text(run_id + "\n")
    return wandb.init(
        project=options.project,
        name=options.name,
        mode=options.mode,
        config=options.config,
        id=run_id,
        resume="allow",
        dir=None if os.environ.get("WANDB_DIR") else str(workdir),
        reinit="create_new",
    )


def _scalars(split: str, metrics: dict) -> dict[str, float]:
    """``{"split/name": value}`` of the finite int / float metrics (lists and strings left out)."""
    return {
        f"{split}/{k}": v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class MetricsWriter:
    """Writes metrics to ``workdir/metrics.jsonl`` (+ tensorboardX events under ``workdir/tb``,
    + a Weights & Biases run when ``wandb`` is given).

    Args:
      workdir: the run's directory.
      tensorboard: also write TensorBoard events.
      wandb: the W&B run to log to, or None.
    """

    def __init__(
        self, workdir: Path, *, tensorboard: bool = False, wandb: WandbOptions | None = None
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if self.enabled and wandb is not None:
            self._wandb = _start_wandb(Path(workdir), wandb)
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
        if self._wandb is not None:
            scalars = _scalars(split, metrics)
            if scalars:
                self._wandb.log(scalars, step=int(step))

    def truncate_after(self, step: int | None) -> int:
        """Drops the records after ``step`` (all records when None); returns how many.

        Args:
          step: the step a resumed run restarts from (its restored checkpoint), or None.

        Returns:
          The number of records removed.
        """
        if not self.enabled or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if step is not None and record_step <= step:
                keep.append(line)
        if len(keep) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        return len(lines) - len(keep)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Progress of a run on process 0: a tqdm bar, or periodic one-line logs.

    Args:
      total: the run's last step.
      initial: the step it starts (or resumes) from.
      bar: show a tqdm bar when stderr is a terminal; otherwise (or when False) log lines.
      interval_s: the least time between two log lines.
      stream: where log lines go (default: ``sys.stderr``).
    """

    def __init__(
        self, total: int, initial: int, bar: bool, *, interval_s: float = 30.0, stream=None
    ):
        self.total, self.initial = total, initial
        self.interval_s = interval_s
        self.enabled = jax.process_index() == 0
        self._stream = stream
        self._bar = None
        self._start = time.monotonic()
        self._last_line = None
        if self.enabled and bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, n: int, postfix: dict[str, float]) -> None:
        """Advances to ``step`` (``n`` steps since the last update), showing ``postfix``
        (e.g. ``{"loss": 1.2, "tokens/s": 9e3}``)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if step >= self.total:  # the run's summary line follows
            return
        if self._last_line is not None and now - self._last_line < self.interval_s:
            return
        self._last_line = now
        elapsed = now - self._start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {v:.4g}" for k, v in postfix.items()]
        parts.append(f"elapsed {_duration(elapsed)}")
        if math.isfinite(eta):
            parts.append(f"ETA {_duration(eta)}")
        say("fwjax train: " + ", ".join(parts), self._stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def say(message: str, stream=None) -> None:
    """Prints one line to ``stream`` (default stderr), ignoring a closed output: a run whose
    reader has gone (a parent process killed, a closed pipe) keeps training and saving."""
    with contextlib.suppress(OSError):  # BrokenPipeError, or a closed file descriptor
        print(message, file=stream if stream is not None else sys.stderr, flush=True)
