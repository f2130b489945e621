"""Harder recall tasks (MQAR, multi-hop) across sequence lengths: softmax vs fast weight rules.

    python -m experiments.recall [--task mqar|multihop|all] [--quick]

Every point (task, variant, size) trains a :class:`~fwjax.nn.TransformerLM` in the training
loop (:func:`fwjax.train.recall.run_recall`) and is written, as soon as it finishes, to its own
JSON file under ``experiments/results/recall/`` (atomically; a point in flight checkpoints into
``recall/runs/`` at every evaluation, so a killed run resumes it). Points whose file exists
are skipped, so re-running the same command resumes. After every point the merged
``experiments/results/recall.csv``, ``recall.md`` (table) and ``recall.png`` (final answer
accuracy against sequence length, one curve per variant, one panel per task) are rewritten.

Variants (same d_model, layers, heads, feed-forward width and steps):

* ``softmax``: causal softmax attention with sinusoidal positions.
* ``sum``: the linear transformer, ELU+1 with attention normalisation, sum rule.
* ``delta``: the paper's delta rule, ELU+1 with sum normalisation.
* ``gated_delta``: the gated delta rule (Gated DeltaNet), identity map with L2 normalisation.

The fast weight layers use DeltaNet's short causal convolution (``short_conv``, size 4) and no
positions: it is what lets a recurrent layer bind a key to the value that follows it (softmax
attention learns that from the positions instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import sys
import time
from pathlib import Path

import jax

from experiments import sweep as sweep_lib
from experiments.records import write_json_atomic
from fwjax.data.recall import MQARTask, MultiHopTask, RecallTask
from fwjax.nn.config import (
    PAPER_RECIPE,
    AttentionKind,
    FastWeightConfig,
    ModelConfig,
    Positional,
)
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule
from fwjax.train.recall import recall_train_config, run_recall
from fwjax.validation import check_positive_ints

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("mqar", "multihop")

# name -> fast weight configuration; None for softmax attention.
VARIANTS: dict[str, FastWeightConfig | None] = {
    "softmax": None,
    "sum": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.ELU_P1),
        normalization=Normalization.ATTENTION,
        update_rule=UpdateRule.SUM,
        short_conv=True,
    ),
    "delta": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.ELU_P1),
        normalization=Normalization.SUM,
        update_rule=UpdateRule.DELTA,
        short_conv=True,
    ),
    "gated_delta": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.IDENTITY),
        normalization=Normalization.L2,
        update_rule=UpdateRule.GATED_DELTA,
        short_conv=True,
    ),
}

CSV_COLUMNS = (
    "task",
    "variant",
    "size",
    "length",
    "accuracy",
    "hop1_accuracy",
    "hop2_accuracy",
    "best_accuracy",
    "loss",
    "steps",
    "seconds",
    "num_params",
    "seed",
    "device",
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model and training sizes shared by every point of a sweep.

    Attributes:
      d_model, num_layers, num_heads, d_ff: the model (``num_layers`` for MQAR).
      multihop_layers: layers for the multi-hop task (a 2-hop lookup by softmax attention
        takes three: a previous-token step and two retrievals).
      steps, batch_size, learning_rate: training (:meth:`fields`).
      softmax_embedding_std: the softmax models' input embedding initialisation (see
        ``RecallTaskConfig.embedding_std``); fast weight models keep the LM's N(0, 1).
      eval_sequences: evaluation sequences per point.
      num_keys, num_values: MQAR's key and value ranges; multi-hop uses ``num_keys`` entities.
    """

    d_model: int = 64
    num_layers: int = 2
    multihop_layers: int = 3
    num_heads: int = 2
    d_ff: int = 128
    steps: int = 900
    batch_size: int = 16
    learning_rate: float = 3e-3
    softmax_embedding_std: float | None = 0.125
    eval_sequences: int = 256
    num_keys: int = 32
    num_values: int = 16

    def fields(self, seed: int, variant: str) -> dict:
        """Overrides of the protocol config (``recall_mqar_delta``) for one run."""
        softmax = VARIANTS[variant] is None
        every = max(self.steps // 4, 1)  # evaluate, log and checkpoint four times
        return {
            "recall.embedding_std": self.softmax_embedding_std if softmax else None,
            "recall.eval_sequences": self.eval_sequences,
            "recall.eval_batch_size": min(64, self.eval_sequences),
            "steps": self.steps, "batch_size": self.batch_size, "seed": seed,
            "eval_every": every, "log_every": every, "checkpoint.every_steps": every,
            "optimizer.learning_rate": self.learning_rate,
            "optimizer.warmup_steps": min(100, self.steps // 10),
        }  # fmt: skip


FULL = Scale()
QUICK = Scale(steps=60, batch_size=8, eval_sequences=32, multihop_layers=2)
# Sizes swept per task: MQAR pairs P (with D = P distractors and Q = P queries: T = 5P + 1);
# multi-hop chains C of 2 links (P = 2C pairs, D = P, Q = P, hops 1..2: T = 6P + 1).
SIZES = {"mqar": (4, 8, 16), "multihop": (2, 4, 8)}
QUICK_SIZES = {"mqar": (4,), "multihop": (2,)}


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep.

    Attributes:
      task: "mqar" or "multihop".
      variant: a key of :data:`VARIANTS`.
      size: MQAR pairs ``P`` or multi-hop chains ``C``.
      seed: initialisation and data seed.
    """

    task: str
    variant: str
    size: int
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} not in {TASKS}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} not in {sorted(VARIANTS)}")
        check_positive_ints(size=self.size)

    @property
    def name(self) -> str:
        return f"{self.task}_{self.variant}_s{self.size}_seed{self.seed}"

    def make_task(self, scale: Scale) -> RecallTask:
        if self.task == "mqar":
            p = self.size
            return MQARTask(
                p,
                num_queries=p,
                num_distractors=p,
                num_keys=scale.num_keys,
                num_values=scale.num_values,
            )
        p = 2 * self.size
        return MultiHopTask(
            self.size,
            chain_length=2,
            max_hops=2,
            num_queries=p,
            num_distractors=p,
            num_entities=scale.num_keys,
        )

    def model_config(self, scale: Scale, vocab_size: int) -> ModelConfig:
        fw = VARIANTS[self.variant]
        # The paper's recipe, as these results were produced with it (without dropout).
        common = dict(
            PAPER_RECIPE,
            vocab_size=vocab_size,
            d_model=scale.d_model,
            num_layers=scale.num_layers if self.task == "mqar" else scale.multihop_layers,
            num_heads=scale.num_heads,
            d_ff=scale.d_ff,
            dropout=0.0,
        )
        if fw is None:
            kinds = (AttentionKind.SOFTMAX,) * common["num_layers"]
            return ModelConfig(layer_kinds=kinds, **common)
        return ModelConfig(fast_weight=fw, **dict(common, positional=Positional.NONE))


def sweep(tasks: tuple[str, ...], quick: bool, seed: int = 0) -> list[Point]:
    """The points of a sweep, cheapest (shortest) first within each task."""
    sizes = QUICK_SIZES if quick else SIZES
    return [Point(t, v, s, seed) for t in tasks for s in sizes[t] for v in VARIANTS]


def point_path(out_dir: Path, point: Point) -> Path:
    return out_dir / f"{point.name}.json"


def run_point(point: Point, scale: Scale, out_dir: Path) -> dict:
    """Trains one point in the training loop (checkpoints in ``out_dir/runs/NAME``, so a
    killed point resumes; deleted once the record is written) and writes its JSON record
    atomically; returns the record."""
    task = point.make_task(scale)
    fields = scale.fields(point.seed, point.variant)
    workdir = out_dir / "runs" / point.name
    config = recall_train_config(task, point.model_config(scale, task.vocab_size), fields)
    result = run_recall(config, workdir)
    record = dict(
        task=point.task,
        variant=point.variant,
        size=point.size,
        length=task.length,
        accuracy=result.accuracy,
        hop1_accuracy=result.hop_accuracy.get(1, ""),
        hop2_accuracy=result.hop_accuracy.get(2, ""),
        best_accuracy=result.best_accuracy,
        loss=result.loss,
        steps=result.steps,
        seconds=round(result.seconds, 1),
        num_params=result.num_params,
        seed=point.seed,
        device=jax.default_backend(),
        scale=dataclasses.asdict(scale),
        task_config=dataclasses.asdict(task),
        history=[list(h) for h in result.history],
    )
    write_json_atomic(point_path(out_dir, point), record)
    shutil.rmtree(workdir)
    return record


def load_records(out_dir: Path) -> list[dict]:
    """Every finished point, sorted by (task, variant, length)."""
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sweep_lib.load_records(
        out_dir,
        lambda r: (TASKS.index(r["task"]), order[r["variant"]], r["length"], r["seed"]),
    )


def write_table(records: list[dict], path: Path) -> None:
    """Markdown tables, one per task: a row per sequence length, a column per variant; cells
    ``accuracy`` (multi-hop: ``accuracy (1-hop / 2-hop)``)."""
    lines = ["Final answer accuracy on the evaluation set per sequence length T.", ""]
    for task in TASKS:
        subset = [r for r in records if r["task"] == task]
        if not subset:
            continue
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in subset)]
        cells = {(r["variant"], r["length"]): r for r in subset}
        lines += [
            f"**{task}**" + (" (accuracy (1-hop / 2-hop))" if task == "multihop" else ""),
            "",
            "| T | size | " + " | ".join(variants) + " |",
            "|---:|---:|" + "---:|" * len(variants),
        ]
        for length in sorted({r["length"] for r in subset}):
            size = next(r["size"] for r in subset if r["length"] == length)
            row = []
            for v in variants:
                r = cells.get((v, length))
                if r is None:
                    row.append("")
                elif task == "multihop":
                    row.append(
                        f"{r['accuracy']:.3f} ({_fmt(r['hop1_accuracy'])} / "
                        f"{_fmt(r['hop2_accuracy'])})"
                    )
                else:
                    row.append(f"{r['accuracy']:.3f}")
            lines.append(f"| {length} | {size} | " + " | ".join(row) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def _fmt(x) -> str:
    return "" if x == "" else f"{x:.2f}"


def write_plot(records: list[dict], path: Path) -> None:
    """Final accuracy against sequence length, one curve per variant, one panel per task
    (multi-hop: solid all queries, dotted 2-hop queries only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.2), squeeze=False)
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors, strict=False))
    for ax, task in zip(axes[0], TASKS, strict=True):
        subset = [r for r in records if r["task"] == task]
        for v in VARIANTS:
            pts = sorted(
                (r["length"], r["accuracy"], r["hop2_accuracy"])
                for r in subset
                if r["variant"] == v
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], "-", marker="o", ms=4, color=colors[v], label=v)
            if task == "multihop":
                hop2 = [(x, p[2]) for x, p in zip(xs, pts, strict=True) if p[2] != ""]
                if hop2:
                    ax.plot(*zip(*hop2, strict=True), ":", marker="x", ms=4, color=colors[v])
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in subset})
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("answer accuracy")
        title = "MQAR" if task == "mqar" else "multi-hop (dotted: 2-hop queries)"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if subset:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, results_dir: Path) -> list[dict]:
    """Merges the point files into ``recall.csv``, ``recall.md`` and ``recall.png``."""
    records = load_records(out_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    sweep_lib.write_csv(records, results_dir / "recall.csv", CSV_COLUMNS)
    write_table(records, results_dir / "recall.md")
    write_plot(records, results_dir / "recall.png")
    return records


def run_sweep(
    points: list[Point], scale: Scale, *, out_dir: Path, results_dir: Path, log=print
) -> list[dict]:
    """Runs the points without a finished record, rewriting the outputs after each one.

    Returns:
      Every finished record (before or now).
    """
    return sweep_lib.run_points(
        points,
        functools.partial(run_point, scale=scale, out_dir=out_dir),
        path=functools.partial(point_path, out_dir),
        write_outputs=functools.partial(write_outputs, out_dir, results_dir),
        describe=lambda p, r: (
            f"  {p.name} (T={r['length']}): accuracy {r['accuracy']:.3f}, "
            f"loss {r['loss']:.3f} ({r['seconds']:.0f} s)"
        ),
        log=log,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sweep_lib.limit_threads()
    tasks = TASKS if args.task == "all" else (args.task,)
    scale = QUICK if args.quick else FULL
    # Quick points go to their own folder so they never mix with the real sweep.
    out_dir = args.results / ("recall_quick" if args.quick else "recall")
    start = time.perf_counter()
    run_sweep(
        sweep(tasks, args.quick, args.seed),
        scale,
        out_dir=out_dir,
        results_dir=args.results if not args.quick else out_dir,
    )
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
