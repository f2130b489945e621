"""MQAR under Zoology's protocol (Arora et al., 2023): softmax attention and the fast weight rules
with one recipe.

    python -m experiments.recall_zoology [--length 64] [--pairs 4 8 16] [--d-model 64]
        [--lr 3e-3] [--steps 2000] [--seeds 1] [--workers 1] [--quick]

Data: :class:`~fwjax.data.recall.ZoologyMQARTask` (Zoology's generator: vocabulary 1024 here,
power-law query gaps, random filler). Model, identical for every variant but the sequence mixer
(Zoology's ``[BaseConv, mixer]`` hybrid): a 2-layer :class:`~fwjax.nn.TransformerLM` whose first
block is Zoology's gated short convolution (``base_conv``, kernel 3) and whose second is the
sequence mixer; no feed-forward (``d_ff = 0``), no positions, pre-LN, 2 heads. AdamW (lr
``--lr``, 100 warmup, cosine, wd 0.1), batch 64, ``--steps`` steps; evaluation on 512 fixed
sequences. Variants: ``softmax``; ``sum`` (ELU+1, attention normalisation: the linear
transformer); ``sum_dpfp`` (DPFP-1, attention normalisation); ``delta`` (identity φ, L2:
DeltaNet); ``delta_sumnorm`` (ELU+1, sum normalisation: the paper's delta rule);
``gated_delta`` (identity φ, L2).

Each point (length, pairs, d_model, variant, learning rate, steps, seed) is written to
``experiments/results/recall_zoology/`` when it finishes (re-running resumes), with its
evaluation curve; ``recall_zoology.{md,csv,png}`` are rewritten after each. Several ``--lr`` or
``--steps`` values make a sweep: the table and figure report, per model and grid point, the
(learning rate, steps) setting with the best mean accuracy over seeds (as Zoology reports the
best of its sweep).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

from experiments import sweep as sweep_lib
from experiments.records import write_json_atomic
from fwjax.data.recall import ZoologyMQARTask
from fwjax.nn.config import AttentionKind, FastWeightConfig, ModelConfig, Positional
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule
from fwjax.train.recall import recall_train_config, run_recall

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "recall_zoology"
VOCAB = 1024

_L2 = dict(feature_map=FeatureMap(FeatureMapKind.IDENTITY), normalization=Normalization.L2)
VARIANTS: dict[str, FastWeightConfig | None] = {
    "softmax": None,
    "sum": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.ELU_P1),
        normalization=Normalization.ATTENTION,
        update_rule=UpdateRule.SUM,
    ),
    "sum_dpfp": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.DPFP, nu=1),
        normalization=Normalization.ATTENTION,
        update_rule=UpdateRule.SUM,
    ),
    "delta": FastWeightConfig(**_L2, update_rule=UpdateRule.DELTA),
    "delta_sumnorm": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.ELU_P1),
        normalization=Normalization.SUM,
        update_rule=UpdateRule.DELTA,
    ),
    "gated_delta": FastWeightConfig(**_L2, update_rule=UpdateRule.GATED_DELTA),
}


def model_config(
    variant: str,
    d_model: int,
    length: int = 64,
    *,
    depth: int = 1,
    vocab_size: int = VOCAB,
    d_ff: int = 0,
) -> ModelConfig:
    """Zoology's recall model: ``depth`` × [BaseConv, mixer] (``depth`` 1: Zoology's 2 layers),
    no feed-forward (``d_ff`` > 0 adds one to every block), no positions, 2 heads."""
    fw = VARIANTS[variant]
    mixer = AttentionKind.SOFTMAX if fw is None else AttentionKind.FAST_WEIGHT
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=2 * depth,
        num_heads=2,
        d_ff=d_ff,
        layer_kinds=(AttentionKind.BASE_CONV, mixer) * depth,
        fast_weight=fw or FastWeightConfig(),
        positional=Positional.NONE,
        max_len=length,
    )


def training_fields(steps: int, lr: float, seed: int) -> dict:
    """The recipe's training overrides: AdamW at ``lr`` (100 warmup steps, cosine, weight decay
    0.1), batch 64, four evaluations on 512 fixed sequences."""
    return {
        "steps": steps,
        "seed": seed,
        "batch_size": 64,
        "eval_every": max(steps // 4, 1),
        "log_every": max(steps // 4, 1),
        "checkpoint.every_steps": steps,
        "optimizer.learning_rate": lr,
        "optimizer.warmup_steps": min(100, steps),
        "optimizer.weight_decay": 0.1,
        "recall.eval_sequences": 512,
    }


def run_point(point, *, out: Path = OUT) -> dict:
    length, pairs, d_model, variant, lr, steps, seed = point
    task = ZoologyMQARTask(vocab_size=VOCAB, length=length, num_pairs=pairs)
    fields = training_fields(steps, lr, seed)
    start = time.perf_counter()
    config = recall_train_config(task, model_config(variant, d_model, length), fields)
    result = run_recall(config)
    record = dict(
        pairs=pairs,
        d_model=d_model,
        variant=variant,
        seed=seed,
        steps=steps,
        lr=lr,
        length=length,
        vocab=VOCAB,
        accuracy=result.accuracy,
        loss=result.loss,
        seconds=time.perf_counter() - start,
        # (step, eval accuracy) at each of the evaluations: whether accuracy still rises
        curve=[[step, acc] for step, _, _, acc in result.history],
    )
    write_json_atomic(_path(point, out), record)
    return record


def _path(point, out: Path = OUT) -> Path:
    length, pairs, d_model, variant, lr, steps, seed = point
    name = f"T{length}_p{pairs}_d{d_model}_{variant}_lr{lr:g}_steps{steps}_seed{seed}.json"
    return out / name


def _grid_key(record: dict) -> tuple:
    return (record["length"], record["d_model"], record["pairs"], record["variant"])


def best_setting(records: list[dict]) -> dict[tuple, tuple[tuple[float, int], list[dict]]]:
    """Per ``(length, d_model, pairs, variant)``: the ``(lr, steps)`` setting whose seeds' mean
    accuracy is highest, and those seeds' records."""
    runs: dict[tuple, dict[tuple[float, int], list[dict]]] = {}
    for r in records:
        runs.setdefault(_grid_key(r), {}).setdefault((r["lr"], r["steps"]), []).append(r)
    mean = lambda rs: statistics.mean(r["accuracy"] for r in rs)
    return {key: max(by_lr.items(), key=lambda kv: mean(kv[1])) for key, by_lr in runs.items()}


def still_rising(record: dict, margin: float = 0.01) -> bool:
    """Whether a point's accuracy rose by more than ``margin`` over its last quarter of training
    (its last two evaluations): not yet at a plateau. False for records without a curve."""
    curve = record.get("curve") or []
    return len(curve) >= 2 and curve[-1][1] - curve[-2][1] > margin


def write_outputs(out: Path = OUT, results: Path = RESULTS) -> list[dict]:
    """Merges the point files into ``results/recall_zoology.{csv,md,png}``."""
    key = lambda r: (
        r["length"],
        r["d_model"],
        r["pairs"],
        list(VARIANTS).index(r["variant"]),
        r["lr"],
        r["steps"],
        r["seed"],
    )
    records = sweep_lib.load_records(out, key)
    columns = [
        "length",
        "pairs",
        "d_model",
        "variant",
        "seed",
        "steps",
        "lr",
        "vocab",
        "accuracy",
        "loss",
        "seconds",
    ]
    sweep_lib.write_csv(records, results / "recall_zoology.csv", columns)
    best = best_setting(records)
    names = [v for v in VARIANTS if any(r["variant"] == v for r in records)]
    lines = [
        "| T | d_model | pairs | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for length, d_model, pairs in sorted({k[:3] for k in best}):
        cells = []
        for v in names:
            if (length, d_model, pairs, v) not in best:
                cells.append("–")
                continue
            (lr, steps), rs = best[length, d_model, pairs, v]
            accs = [r["accuracy"] for r in rs]
            spread = f", {min(accs):.3f}–{max(accs):.3f}" if len(accs) > 1 else ""
            point = (length, d_model, pairs, v)
            tried = {(r["lr"], r["steps"]) for r in records if _grid_key(r) == point}
            sweep = f", lr {lr:g}, {steps} steps"
            sweep += f"; best of {len(tried)}" if len(tried) > 1 else ""
            seeds = f"{len(accs)} seed" + "s" * (len(accs) > 1)
            rising = " ↑" if any(still_rising(r) for r in rs) else ""
            cells.append(f"{statistics.mean(accs):.3f}{rising} ({seeds}{spread}{sweep})")
        lines.append(f"| {length} | {d_model} | {pairs} | " + " | ".join(cells) + " |")
    (results / "recall_zoology.md").write_text("\n".join(lines) + "\n")
    if records:
        plot(best, names, results / "recall_zoology.png")
    return records


def plot(best: dict[tuple, tuple[tuple, list[dict]]], names: list[str], path: Path) -> None:
    """Zoology's figure: one column per sequence length. Top row: accuracy (best setting, mean
    over seeds; dots: each seed) against the number of key-value pairs, one line per model
    and d_model. Bottom row (when several d_model were run): accuracy against d_model, the
    state size axis of Zoology's figure, one line per model and number of pairs."""
    from experiments import plotting

    lengths = sorted({k[0] for k in best})
    dims = sorted({k[1] for k in best})
    rows = 2 if len(dims) > 1 else 1
    styles = ("-", "--", ":", "-.")

    def draw(ax, keys, x_of, color, style, label, marker="o"):
        xs = [x_of(k) for k in keys]
        accs = [[r["accuracy"] for r in best[k][1]] for k in keys]
        means = [statistics.mean(a) for a in accs]
        ax.plot(xs, means, marker + style, color=color, label=label, markersize=6)
        for x, a in zip(xs, accs, strict=True):
            ax.plot([x] * len(a), a, ".", color=color, alpha=0.4)

    with plotting.style() as plt:
        fig, axes = plt.subplots(
            rows,
            len(lengths),
            figsize=(5 * len(lengths), 4 * rows),
            squeeze=False,
            layout="constrained",
        )
        for col, length in enumerate(lengths):
            at = [k for k in best if k[0] == length]
            for i, v in enumerate(names):
                for j, d in enumerate(dims):
                    keys = sorted(k for k in at if k[1] == d and k[3] == v)
                    if keys:
                        label = v if len(dims) == 1 else f"{v}, d {d}"
                        marker = "os^D"[j % 4]  # one marker (and line style) per d_model
                        args = (lambda k: k[2], f"C{i}", styles[j % 4], label, marker)
                        draw(axes[0][col], keys, *args)
                if rows == 2:
                    pairs = sorted({k[2] for k in at if k[3] == v})
                    multi = [p for p in pairs if len({k[1] for k in at if k[2] == p}) > 1]
                    for j, p in enumerate(multi):
                        keys = sorted(k for k in at if k[2] == p and k[3] == v)
                        label = f"{v}, {p} pairs"
                        draw(axes[1][col], keys, lambda k: k[1], f"C{i}", styles[j % 4], label)
            axes[0][col].set_xlabel("key-value pairs")
            axes[0][col].set_title(f"MQAR (Zoology protocol), T {length}")
            if rows == 2:
                axes[1][col].set_xlabel("d_model (state size)")
                axes[1][col].set_title(f"T {length}: accuracy vs model dimension")
            for ax in axes[:, col]:
                ax.set_xscale("log", base=2)
                ax.set_ylim(0, 1.05)
                ax.set_ylabel("answer accuracy")
        for ax in axes.flat:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower left")
            else:  # a bottom panel whose length has one d_model per point
                ax.set_xticks([], minor=False)
                ax.set_xticks([], minor=True)
                ax.text(0.5, 0.5, "one d_model per point", ha="center", transform=ax.transAxes)
        fig.savefig(path)
        plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, nargs="+", default=[64])
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--d-model", type=int, nargs="+", default=[64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[2000])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    parser.add_argument(
        "--workers", type=int, default=1, help="points at once, one core and XLA thread each"
    )
    parser.add_argument("--quick", action="store_true", help="one point, 10 steps, into /tmp")
    args = parser.parse_args(argv)
    out, results = OUT, RESULTS
    if args.quick:
        out = results = Path("/tmp/fwjax_recall_zoology_quick")
        args.pairs, args.d_model, args.seeds, args.steps = [4], [64], 1, [10]
    out.mkdir(parents=True, exist_ok=True)
    points = [
        (n, p, d, v, lr, steps, s)
        for n in args.length
        for d in args.d_model
        for p in args.pairs
        for v in args.variants
        for lr in args.lr
        for steps in args.steps
        for s in range(args.seeds)
    ]
    sweep_lib.run_points(
        points,
        functools.partial(run_point, out=out),
        workers=args.workers,
        path=functools.partial(_path, out=out),
        write_outputs=functools.partial(write_outputs, out, results),
        describe=lambda p, r: f"{p}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)",
    )


if __name__ == "__main__":
    main()
