"""Multi-hop recall under Zoology's model recipe: does depth let softmax attention compose lookups?

    python -m experiments.recall_multihop [--depth 1 2] [--variants softmax delta] [--seeds 1]
        [--steps 3000] [--d-ff 0] [--one-hop-steps 0] [--quick]

Task: :class:`~fwjax.data.recall.MultiHopTask` with 8 chains of 2 links over 64 entities, no
distractors, 8 queries per sequence, half of them 1-hop and half 2-hop (``T = 57``). A 2-hop
query ``HOP_2 e`` needs two lookups in sequence: find the pair whose subject is ``e``, map its
object id to the same entity's subject id, find that pair. Model: the recipe of
:mod:`experiments.recall_zoology` (``[BaseConv, mixer]`` blocks, no feed-forward, no positions,
d_model 64, 2 heads, AdamW lr 3e-3, batch 64) with ``depth`` blocks: ``depth`` 1 is Zoology's
2-layer model, which has one sequence-mixing lookup; ``depth`` 2 has two. ``--d-ff`` adds a
feed-forward layer to every block (Zoology's recall models have none): a per-token map that can
turn an entity's object id into its subject id between the two lookups.

``--one-hop-steps N`` is a curriculum: the first ``N`` training batches score only their 1-hop
answers (the 2-hop queries stay in the sequence, unscored); ``N >= steps`` never trains on 2-hop
answers. Evaluation always scores both hop counts.

Each point (depth, d_ff, variant, steps, seed, one-hop steps) is written to
``experiments/results/recall_multihop/`` when it finishes (re-running resumes), with its
evaluation curve; ``recall_multihop.{md,csv}`` are rewritten after each. Reported: accuracy on
1-hop and 2-hop queries of 512 fixed evaluation sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from pathlib import Path

from experiments import sweep as sweep_lib
from experiments.recall_zoology import VARIANTS, model_config, training_fields
from experiments.records import write_json_atomic
from fwjax.data.recall import MultiHopTask
from fwjax.train.recall import recall_train_config, run_recall

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "recall_multihop"
TASK = MultiHopTask(num_chains=8, chain_length=2, max_hops=2, num_queries=8, num_entities=64)


def run_point(point, *, task: MultiHopTask = TASK, out: Path = OUT) -> dict:
    depth, d_ff, variant, steps, seed, one_hop_steps = _full(point)
    task = dataclasses.replace(task, one_hop_steps=one_hop_steps)
    fields = training_fields(steps, 3e-3, seed)
    model = model_config(
        variant, 64, task.length, depth=depth, vocab_size=task.vocab_size, d_ff=d_ff
    )
    start = time.perf_counter()
    result = run_recall(recall_train_config(task, model, fields))
    record = dict(
        depth=depth,
        d_ff=d_ff,
        variant=variant,
        seed=seed,
        steps=steps,
        one_hop_steps=one_hop_steps,
        length=task.length,
        accuracy=result.accuracy,
        hop1_accuracy=result.hop_accuracy.get(1),
        hop2_accuracy=result.hop_accuracy.get(2),
        seconds=time.perf_counter() - start,
        # (step, eval accuracy over both hop counts) at each evaluation
        curve=[[step, acc] for step, _, _, acc in result.history],
    )
    write_json_atomic(_path(point, out), record)
    return record


def _full(point) -> tuple:
    """``(depth, d_ff, variant, steps, seed, one_hop_steps)``; 5-tuples have no curriculum."""
    return (*point, 0) if len(point) == 5 else tuple(point)


def _path(point, out: Path = OUT) -> Path:
    depth, d_ff, variant, steps, seed, one_hop_steps = _full(point)
    curriculum = f"_onehop{one_hop_steps}" if one_hop_steps else ""
    return out / f"depth{depth}_ff{d_ff}_{variant}_steps{steps}{curriculum}_seed{seed}.json"


def write_outputs(out: Path = OUT, results: Path = RESULTS) -> list[dict]:
    """Merges the point files into ``results/recall_multihop.{csv,md}``."""
    order = list(VARIANTS)

    def sort_key(r):
        curriculum = r.get("one_hop_steps", 0)
        return r["depth"], r["d_ff"], order.index(r["variant"]), r["steps"], curriculum, r["seed"]

    records = sweep_lib.load_records(out, sort_key)
    for r in records:
        r.setdefault("one_hop_steps", 0)  # points from before the curriculum option
    columns = ["depth", "d_ff", "variant", "seed", "steps", "one_hop_steps", "length", "accuracy"]
    columns += ["hop1_accuracy", "hop2_accuracy", "seconds"]
    sweep_lib.write_csv(records, results / "recall_multihop.csv", columns)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["depth"], r["d_ff"], r["variant"], r["steps"], r["one_hop_steps"])
        groups.setdefault(key, []).append(r)
    lines = [
        "| [BaseConv, mixer] blocks | d_ff | mixer | steps | of which 1-hop only | seeds "
        "| 1-hop | 2-hop | s / point |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (depth, d_ff, variant, steps, one_hop_steps), rs in groups.items():
        hop1, hop2, seconds = (
            statistics.mean(r[name] for r in rs)
            for name in ("hop1_accuracy", "hop2_accuracy", "seconds")
        )
        cells = [depth, d_ff, variant, steps, one_hop_steps, len(rs)]
        cells += [f"{hop1:.3f}", f"{hop2:.3f}", f"{seconds:.0f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    (results / "recall_multihop.md").write_text("\n".join(lines) + "\n")
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=["softmax", "delta"])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[3000])
    parser.add_argument("--d-ff", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--one-hop-steps",
        type=int,
        nargs="+",
        default=[0],
        help="a curriculum: the first so many training batches score only 1-hop answers",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="points at once, one core and XLA thread each"
    )
    parser.add_argument("--quick", action="store_true", help="one point, 10 steps, into /tmp")
    args = parser.parse_args(argv)
    out, results = OUT, RESULTS
    if args.quick:
        out = results = Path("/tmp/fwjax_recall_multihop_quick")
        args.depth, args.variants, args.seeds, args.steps = [1], ["softmax"], 1, [10]
    out.mkdir(parents=True, exist_ok=True)
    points = [
        (d, ff, v, steps, s, one_hop)
        for d in args.depth
        for ff in args.d_ff
        for v in args.variants
        for steps in args.steps
        for one_hop in args.one_hop_steps
        for s in range(args.seeds)
    ]
    sweep_lib.run_points(
        points,
        functools.partial(run_point, out=out),
        workers=args.workers,
        path=functools.partial(_path, out=out),
        write_outputs=functools.partial(write_outputs, out, results),
        describe=lambda p, r: (
            f"{p}: 1-hop {r['hop1_accuracy']:.3f}, 2-hop {r['hop2_accuracy']:.3f} "
            f"({r['seconds']:.0f} s)"
        ),
    )


if __name__ == "__main__":
    main()
