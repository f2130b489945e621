"""MQAR under Zoology's protocol (Arora et al., 2023): softmax attention and the fast weight rules
with one recipe.

    python -m experiments.recall_zoology [--pairs 4 8 16] [--d-model 64] [--seeds 1] [--quick]

Data: :class:`~fwjax.data.recall.ZoologyMQARTask` (Zoology's generator: vocabulary 1024 here,
power-law query gaps, random filler). Model, identical for every variant but the sequence mixer
(Zoology's ``[BaseConv, mixer]`` hybrid): a 2-layer :class:`~fwjax.nn.TransformerLM` whose first
block is Zoology's gated short convolution (``base_conv``, kernel 3) and whose second is the
sequence mixer; no feed-forward (``d_ff = 0``), no positions, pre-LN, 2 heads. AdamW (lr
``--lr``, 100 warmup, cosine, wd 0.1), batch 64, ``--steps`` steps; evaluation on 512 fixed
sequences. Variants: ``softmax``; ``sum`` (ELU+1, attention normalisation: the linear
transformer); ``delta`` (identity φ, L2: DeltaNet); ``gated_delta`` (identity φ, L2).

Each point (pairs, d_model, variant, seed) is written to ``experiments/results/recall_zoology/``
when it finishes (re-running resumes); ``recall_zoology.{md,csv}`` are rewritten after each.
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
LENGTH = 64

_L2 = dict(feature_map=FeatureMap(FeatureMapKind.IDENTITY), normalization=Normalization.L2)
VARIANTS: dict[str, FastWeightConfig | None] = {
    "softmax": None,
    "sum": FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.ELU_P1),
        normalization=Normalization.ATTENTION,
        update_rule=UpdateRule.SUM,
    ),
    "delta": FastWeightConfig(**_L2, update_rule=UpdateRule.DELTA),
    "gated_delta": FastWeightConfig(**_L2, update_rule=UpdateRule.GATED_DELTA),
}


def model_config(variant: str, d_model: int) -> ModelConfig:
    fw = VARIANTS[variant]
    mixer = AttentionKind.SOFTMAX if fw is None else AttentionKind.FAST_WEIGHT
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=d_model,
        num_layers=2,
        num_heads=2,
        d_ff=0,
        layer_kinds=(AttentionKind.BASE_CONV, mixer),
        fast_weight=fw or FastWeightConfig(),
        positional=Positional.NONE,
        max_len=LENGTH,
    )


def run_point(point, *, steps: int, lr: float, out: Path = OUT) -> dict:
    pairs, d_model, variant, seed = point
    task = ZoologyMQARTask(vocab_size=VOCAB, length=LENGTH, num_pairs=pairs)
    fields = {
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
    start = time.perf_counter()
    result = run_recall(recall_train_config(task, model_config(variant, d_model), fields))
    record = dict(
        pairs=pairs,
        d_model=d_model,
        variant=variant,
        seed=seed,
        steps=steps,
        lr=lr,
        length=LENGTH,
        vocab=VOCAB,
        accuracy=result.accuracy,
        loss=result.loss,
        seconds=time.perf_counter() - start,
    )
    write_json_atomic(_path(point, out), record)
    return record


def _path(point, out: Path = OUT) -> Path:
    pairs, d_model, variant, seed = point
    return out / f"p{pairs}_d{d_model}_{variant}_seed{seed}.json"


def write_outputs(out: Path = OUT, results: Path = RESULTS) -> list[dict]:
    """Merges the point files into ``results/recall_zoology.{csv,md}``."""
    key = lambda r: (r["d_model"], r["pairs"], list(VARIANTS).index(r["variant"]), r["seed"])
    records = sweep_lib.load_records(out, key)
    columns = [
        "pairs",
        "d_model",
        "variant",
        "seed",
        "steps",
        "lr",
        "length",
        "vocab",
        "accuracy",
        "loss",
        "seconds",
    ]
    sweep_lib.write_csv(records, results / "recall_zoology.csv", columns)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["d_model"], r["pairs"]), []).append(r)
    names = [v for v in VARIANTS if any(r["variant"] == v for r in records)]
    lines = ["| d_model | pairs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (d_model, pairs), rs in groups.items():
        cells = []
        for v in names:
            accs = [r["accuracy"] for r in rs if r["variant"] == v]
            cells.append(f"{statistics.mean(accs):.3f} ({len(accs)})" if accs else "–")
        lines.append(f"| {d_model} | {pairs} | " + " | ".join(cells) + " |")
    (results / "recall_zoology.md").write_text("\n".join(lines) + "\n")
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--d-model", type=int, nargs="+", default=[64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="one point, 10 steps, into /tmp")
    args = parser.parse_args(argv)
    out, results = OUT, RESULTS
    if args.quick:
        out = results = Path("/tmp/fwjax_recall_zoology_quick")
        args.pairs, args.d_model, args.seeds, args.steps = [4], [64], 1, 10
    out.mkdir(parents=True, exist_ok=True)
    points = [
        (p, d, v, s)
        for d in args.d_model
        for p in args.pairs
        for v in args.variants
        for s in range(args.seeds)
    ]
    sweep_lib.run_points(
        points,
        functools.partial(run_point, steps=args.steps, lr=args.lr, out=out),
        path=functools.partial(_path, out=out),
        write_outputs=functools.partial(write_outputs, out, results),
        describe=lambda p, r: f"{p}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)",
    )


if __name__ == "__main__":
    main()
