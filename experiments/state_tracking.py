"""State tracking (running sums modulo m): which fast weight transitions can count?

    python -m experiments.state_tracking [--modulus 2] [--seeds 3] [--steps 1500]
        [--length 64] [--eval-lengths 128 256 512] [--quick]

A 1-layer :class:`~fwjax.nn.TransformerLM` predicts ``(x_1 + … + x_t) mod m`` at every
position of ``T`` random digits (:class:`~fwjax.data.state_tracking.ModularSumTask`), trained in
the one training loop (:func:`fwjax.train.recall.run_recall`). Variants differ only in the
token mixer (identity feature map with L2-normalised keys, no positions, no short convolution):

* ``delta``: the delta rule, ``β = σ(·) ∈ (0, 1)`` (transition eigenvalues in [0, 1]);
* ``delta_neg``: ``β = 2σ(·) ∈ (0, 2)`` (reflections, Grazzi et al., 2025);
* ``product2_neg``: DeltaProduct with 2 steps per token and ``β ∈ (0, 2)`` (rotations as
  products of two reflections, Siems et al., 2025);
* ``recurrent_delta``: the Recurrent Delta Net (Irie et al., 2021): the delta rule whose keys,
  values and write strengths also see tanh of the previous output (softmax feature map);
* ``delta_rnn``, ``delta_lstm``: the Delta RNN and Delta LSTM (Irie et al., 2021): a Delta Net
  whose output feeds back through recurrent fast weights (an LSTM cell for the latter);
* ``srwm``: the modern self-referential weight matrix (Irie et al., 2022);
* ``softmax``: causal softmax attention (no positions: the sum is order-free).

Each point (training length, modulus, variant, seed) is written to its own JSON file under
``experiments/results/state_tracking/`` as soon as it finishes (points with a file are
skipped: re-running resumes); ``state_tracking.md`` / ``.csv`` / ``.png`` are rewritten after
each point. Reported: the final evaluation accuracy over all positions and over the last quarter
of the sequence (the longest sums), the last-quarter accuracy of the same model on longer
sequences (``--eval-lengths``: length generalisation, no training at those lengths), and the
time each point took.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

from experiments import sweep as sweep_lib
from experiments.records import write_json_atomic
from fwjax.data.state_tracking import ModularSumTask
from fwjax.nn.config import AttentionKind, FastWeightConfig, ModelConfig, Positional
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule
from fwjax.train.recall import recall_train_config, run_recall

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "state_tracking"

_L2 = dict(feature_map=FeatureMap(FeatureMapKind.IDENTITY), normalization=Normalization.L2)
_FW, _SOFTMAX, _RDN, _SRWM, _DRNN, _DLSTM = (
    AttentionKind.FAST_WEIGHT,
    AttentionKind.SOFTMAX,
    AttentionKind.RECURRENT_DELTA,
    AttentionKind.SRWM,
    AttentionKind.DELTA_RNN,
    AttentionKind.DELTA_LSTM,
)
# name -> (token mixer, fast weight configuration)
VARIANTS: dict[str, tuple[AttentionKind, FastWeightConfig]] = {
    "delta": (_FW, FastWeightConfig(**_L2, update_rule=UpdateRule.DELTA)),
    "delta_neg": (_FW, FastWeightConfig(**_L2, update_rule=UpdateRule.DELTA, beta_range=2.0)),
    "product2_neg": (
        _FW,
        FastWeightConfig(**_L2, update_rule=UpdateRule.DELTA, beta_range=2.0, householder_steps=2),
    ),
    "recurrent_delta": (_RDN, FastWeightConfig()),
    "delta_rnn": (_DRNN, FastWeightConfig()),
    "delta_lstm": (_DLSTM, FastWeightConfig()),
    "srwm": (_SRWM, FastWeightConfig()),
    "softmax": (_SOFTMAX, FastWeightConfig()),
}


def model_config(variant: str, modulus: int) -> ModelConfig:
    kind, fw = VARIANTS[variant]
    return ModelConfig(
        vocab_size=modulus,
        d_model=64,
        num_layers=1,
        num_heads=4,
        d_ff=128,
        layer_kinds=(kind,),
        fast_weight=fw,
        positional=Positional.NONE,
        max_len=4096,
    )


def run_point(point, *, steps: int, eval_lengths=(), out: Path = OUT) -> dict:
    length, modulus, variant, seed = point
    task = ModularSumTask(modulus=modulus, length=length)
    longer = [ModularSumTask(modulus=modulus, length=n) for n in eval_lengths]
    fields = {
        "steps": steps,
        "seed": seed,
        "batch_size": 32,
        "eval_every": steps,
        "log_every": steps,
        "checkpoint.every_steps": steps,
        "optimizer.learning_rate": 1e-3,
        "optimizer.warmup_steps": 100,
        "recall.eval_sequences": 256,
    }
    config = recall_train_config(task, model_config(variant, modulus), fields)
    start = time.perf_counter()
    result = run_recall(config, transfer=longer)
    record = dict(
        modulus=modulus,
        variant=variant,
        seed=seed,
        steps=steps,
        length=length,
        accuracy=result.accuracy,
        last_quarter_accuracy=result.hop_accuracy[4],
        loss=result.loss,
        longer={
            str(t.length): metrics["hop4_accuracy"]
            for t, metrics in zip(longer, result.transfer, strict=True)
        },
        seconds=time.perf_counter() - start,
    )
    write_json_atomic(_path(point, out), record)
    return record


def _path(point, out: Path = OUT) -> Path:
    length, modulus, variant, seed = point
    return out / f"T{length}_mod{modulus}_{variant}_seed{seed}.json"


def _lengths(r: dict) -> dict[int, float]:
    """Last-quarter accuracy of a record at its training length and every longer length."""
    return {r["length"]: r["last_quarter_accuracy"]} | {
        int(n): acc for n, acc in r.get("longer", {}).items()
    }


def write_outputs(out: Path = OUT, results: Path = RESULTS) -> list[dict]:
    """Merges the point files of ``out`` into ``results/state_tracking.{csv,md,png}``."""
    records = sweep_lib.load_records(
        out, lambda r: (r["length"], r["modulus"], r["variant"], r["seed"])
    )
    longer = sorted({int(n) for r in records for n in r.get("longer", {})})
    flat = [r | {f"last_quarter_T{n}": _lengths(r).get(n) for n in longer} for r in records]
    columns = ["length", "modulus", "variant", "seed", "steps", "accuracy"]
    columns += ["last_quarter_accuracy", *(f"last_quarter_T{n}" for n in longer)]
    sweep_lib.write_csv(flat, results / "state_tracking.csv", [*columns, "loss", "seconds"])
    heads = " | ".join(f"T {n}" for n in longer)
    lines = [
        "| train T | modulus | variant | seeds | accuracy (mean, min–max) | last quarter | "
        f"{heads} | s / point |",
        "|---" * (7 + len(longer)) + "|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["length"], r["modulus"], r["variant"]), []).append(r)
    mean = lambda xs: f"{statistics.mean(xs):.3f}" if xs else "–"
    for (length, modulus, variant), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        at = [mean([_lengths(r)[n] for r in rs if n in _lengths(r)]) for n in longer]
        lines.append(
            f"| {length} | {modulus} | {variant} | {len(rs)} | {statistics.mean(acc):.3f} "
            f"({min(acc):.3f}–{max(acc):.3f}) | "
            f"{mean([r['last_quarter_accuracy'] for r in rs])} | {' | '.join(at)} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    (results / "state_tracking.md").write_text("\n".join(lines) + "\n")
    if records:
        plot(groups, results / "state_tracking.png")
    return records


def plot(groups: dict[tuple, list[dict]], path: Path) -> None:
    """Last-quarter accuracy against the evaluation length (lines: the seeds' mean; dots: each
    seed), one panel per (training length, modulus)."""
    from experiments import plotting

    panels = sorted({(length, m) for length, m, _ in groups})
    variants = [v for v in VARIANTS if any(v == g[2] for g in groups)]
    with plotting.style() as plt:
        fig, axes = plt.subplots(
            1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained"
        )
        for ax, (length, modulus) in zip(axes[0], panels, strict=True):
            for i, variant in enumerate(variants):
                rs = groups.get((length, modulus, variant), [])
                if not rs:
                    continue
                xs = sorted(set.intersection(*(set(_lengths(r)) for r in rs)))
                means = [statistics.mean(_lengths(r)[n] for r in rs) for n in xs]
                ax.plot(xs, means, "o-", color=f"C{i}", label=variant)
                for r in rs:
                    ax.plot(xs, [_lengths(r)[n] for n in xs], ".", color=f"C{i}", alpha=0.4)
            ax.axhline(1 / modulus, color="gray", linestyle=":", label="chance")
            ax.axvline(length, color="gray", linewidth=0.5)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"running sum mod {modulus}, trained at T {length}")
            ax.set_xlabel("evaluation length T")
            ax.set_ylabel("accuracy, last quarter of the sequence")
        axes[0][-1].legend(fontsize=7, loc="lower left")
        fig.savefig(path)
        plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modulus", type=int, nargs="+", default=[2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--length", type=int, nargs="+", default=[64])
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=[128, 256, 512])
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps, into /tmp")
    args = parser.parse_args(argv)
    out, results = OUT, RESULTS
    if args.quick:
        out = results = Path("/tmp/fwjax_state_tracking_quick")
        args.seeds, args.steps, args.length, args.eval_lengths = 1, 20, [16], [32]
    out.mkdir(parents=True, exist_ok=True)
    points = [
        (n, m, v, s)
        for n in args.length
        for m in args.modulus
        for v in args.variants
        for s in range(args.seeds)
    ]
    sweep_lib.run_points(
        points,
        functools.partial(run_point, steps=args.steps, eval_lengths=args.eval_lengths, out=out),
        path=functools.partial(_path, out=out),
        write_outputs=functools.partial(write_outputs, out, results),
        describe=lambda p, r: (
            f"{p}: accuracy {r['accuracy']:.3f}, last quarter "
            f"{r['last_quarter_accuracy']:.3f}, longer {r['longer']} ({r['seconds']:.0f} s)"
        ),
    )


if __name__ == "__main__":
    main()
