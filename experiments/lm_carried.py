"""Carried memory on Tiny Shakespeare (char level): does training with the fast weights carried
from one segment to the next help, and if not, why? Resumable.

::

    python -m experiments.lm_carried run --norms sum,l2,centered_l2 --seeds 0
    python -m experiments.lm_carried run --norms l2 --seeds 1,2
    python -m experiments.lm_carried report

Every model is the reference small-LM recipe of :mod:`experiments.lm` (the config
``shakespeare_char_delta`` / ``shakespeare_char_linear``, read by name with
:func:`fwjax.cli.load_train_config`) with ``positional = "none"`` and ``sampling = "streams"``
(contiguous streams, 12 per batch) for both members of a pair, so that the pair differs only in
``carry_state``:

* ``carry``: the fast weights flow from one training segment of a stream to the next (gradients
  stop at segment edges; the memory is reset at each epoch's start);
* ``nocarry``: every training segment starts from an empty memory (its twin).

``--norms`` picks the key/query normalisation of the delta network (``sum``: the paper's;
``l2``; ``centered_l2``), ``linear`` (the linear transformer: sum rule, attention
normalisation) or ``gated_l2`` (the gated delta rule, ``S_t = α_t S_{t-1} + β_t k_t (v_t −
α_t v̄_t)ᵀ``, with L2 keys: a learned decay that bounds ``‖S‖``). Training logs the memory
diagnostics of :mod:`fwjax.diagnostics` every 50 steps (``FastWeightConfig(diagnostics=True)``:
‖S‖_F, retrieval error and cosine of the last training batch; for a ``carry`` run the memory is
the carried one).

Evaluation reads the whole validation split in chunks of ``L`` tokens, each from an empty memory
carried across its ``L / 64`` segments of 64 tokens: ``L = 64`` are independent segments (the
number of :mod:`experiments.lm`), ``L = 256, 1024, 8192`` a memory reset every ``L`` tokens,
and ``stream`` the whole split as one stream (the carried loss). Per token it keeps the loss, so
the JSON has the loss by position within a segment and by distance from the last reset (the
carried memory's benefit at each distance into a long text), and, for the stream, per segment:
‖S‖_F and (attention normalisation) ‖z‖ of the carried memory
(:func:`fwjax.diagnostics.carried_memory_norms`), and the retrieval error / cosine of
:func:`fwjax.diagnostics.memory_trace`, per layer (mean over heads).

Each finished run is one JSON ``experiments/results/lm_carried/{norm}_{carry|nocarry}_s{seed}``;
runs live in ``runs/lm_carried/`` (a rerun skips finished runs and resumes an unfinished one from
its checkpoint). ``report`` (also run after each run) writes ``experiments/results/lm_carried.md``
(tables) and ``.png`` (‖S‖ over training and over the stream), keeping any text below the
report's ``<!-- findings -->`` line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from experiments.records import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
OUT = RESULTS / "lm_carried"
REPORT = RESULTS / "lm_carried.md"
RUNS = ROOT / "runs" / "lm_carried"
FINDINGS_MARK = "<!-- findings -->"

# norm -> (base config name, overrides)
NORMS: dict[str, tuple[str, list[str]]] = {
    "sum": ("shakespeare_char_delta", []),
    "l2": ("shakespeare_char_delta", ['lm.model.fast_weight.normalization="l2"']),
    "centered_l2": (
        "shakespeare_char_delta",
        ['lm.model.fast_weight.normalization="centered_l2"'],
    ),
    "linear": ("shakespeare_char_linear", []),
    # The gated delta rule (a learned decay α = σ(w_α·x + 3) ≈ 0.95 at init) with L2 keys.
    "gated_l2": (
        "shakespeare_char_delta",
        [
            'lm.model.fast_weight.normalization="l2"',
            'lm.model.fast_weight.update_rule="gated_delta"',
        ],
    ),
}
# What makes the pair's two members differ only in carry_state.
COMMON = [
    'lm.model.positional="none"',
    'lm.sampling="streams"',
    "lm.model.fast_weight.diagnostics=true",
]
# Chunk lengths in segments of T tokens (None: the whole split as one stream); 1 = independent.
CHUNKS: tuple[int | None, ...] = (1, 4, 16, 128, None)
ROWS = 64  # chunks evaluated together
SEGMENT_BUCKETS = 8  # position within a segment: buckets of T / 8 positions
# Distance from the last reset (tokens): bucket edges.
DISTANCE_EDGES = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 1 << 30)


def run_name(norm: str, carry: bool, seed: int) -> str:
    return f"{norm}_{'carry' if carry else 'nocarry'}_s{seed}"


def make_config(norm: str, carry: bool, seed: int, extra: list[str] | None = None):
    """The :class:`~fwjax.train.config.TrainConfig` of one member of a pair."""
    from fwjax.cli import load_train_config

    if norm not in NORMS:
        raise ValueError(f"{norm=} must be one of {sorted(NORMS)}")
    base, overrides = NORMS[norm]
    sets = [*COMMON, *overrides, f"lm.carry_state={str(carry).lower()}", f"seed={seed}"]
    return load_train_config(base, [*sets, *(extra or [])])


# -- evaluation ---------------------------------------------------------------------------------


def _score_fns(model_def):
    """Jitted ``(params, rest, inputs, targets, state) -> (nll [R, T], state[, sown])``: plain
    and with the layers' memory diagnostics captured."""
    import jax
    import optax
    from flax import nnx

    def forward(params, rest, inputs, targets, state):
        model = model_def.merge(params, rest, train=False)
        logits, new_state = model(inputs, state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets), new_state

    def captured(params, rest, inputs, targets, state):
        model = model_def.merge(params, rest, train=False)
        fn = nnx.capture(lambda m: m(inputs, state), nnx.Intermediate)
        (logits, new_state), sown = fn(model)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nll, new_state, nnx.to_pure_dict(sown)

    return jax.jit(forward), jax.jit(captured)


def _layer_means(flat: dict[str, list[float]], stat: str) -> list[float]:
    """Per layer (in order), the mean over heads of ``stat`` from flattened diagnostics."""
    keys = sorted((k for k in flat if k.endswith("." + stat)), key=_layer_index)
    return [float(np.mean(flat[k])) for k in keys]


def _layer_index(key: str) -> int:
    parts = key.split(".")
    return next(int(p) for p in parts if p.isdigit())


def chunked_nll(run, chunk_len: int | None, *, rows: int = ROWS, trace: bool = False):
    """Per-token loss over the validation split read in chunks of ``chunk_len`` tokens, each from
    an empty memory carried across its segments of the training ``segment_len`` T.

    Args:
      run: a restored :class:`~fwjax.train.loop.Run` of an LM with fast weight layers only.
      chunk_len: a multiple of T, or None for the whole split as one stream.
      rows: chunks per call.
      trace: also return, per segment of the first row, per layer (mean over heads): ``‖S‖_F``
        after the segment, ``‖z‖`` (attention normalisation), the retrieval error and cosine.

    Returns:
      ``(nll [n] float64, trace dict or None)``; ``nll[i]`` is the loss of predicting token
      ``i + 1`` of the split.
    """
    import jax
    import jax.numpy as jnp

    from fwjax import diagnostics
    from fwjax.train.loop import flatten_diagnostics

    t = run.task.config.segment_len
    tokens = np.asarray(run.task.valid_tokens)
    n = len(tokens) - 1
    length = -(-n // t) * t if chunk_len is None else chunk_len
    if length % t:
        raise ValueError(f"{chunk_len=} must be a multiple of segment_len={t}")
    starts = np.arange(0, n, length)
    rows = 1 if chunk_len is None else min(rows, len(starts))
    forward, captured = _score_fns(run.model_def)
    params, rest = run.state.params, run.state.rest
    nll = np.full(n, np.nan)
    per_segment: dict[str, list] = {}
    for g in range(0, len(starts), rows):
        group = starts[g : g + rows]
        group = np.concatenate([group, np.full(rows - len(group), group[0])])
        state = run.model().init_state(rows)
        for s in range(length // t):
            pos = group[:, None] + s * t + np.arange(t)[None, :]
            valid = pos < np.minimum(group[:, None] + length, n)
            valid[len(starts[g : g + rows]) :] = False
            if not valid.any():
                break
            idx = np.minimum(pos, n - 1)
            inputs = jnp.asarray(tokens[idx], jnp.int32)
            targets = jnp.asarray(tokens[idx + 1], jnp.int32)
            if trace and g == 0:
                out, state, sown = captured(params, rest, inputs, targets, state)
                flat = flatten_diagnostics(jax.device_get(sown))
                norms = diagnostics.carried_memory_norms(state.layers)
                rec = {
                    "state_norm": np.asarray(norms["state_norm"][:, 0].mean(-1)).tolist(),
                    "retrieval_error": _layer_means(flat, "retrieval_error"),
                    "retrieval_cosine": _layer_means(flat, "retrieval_cosine"),
                }
                if "normalizer_norm" in norms:
                    z = norms["normalizer_norm"][:, 0].mean(-1)
                    rec["normalizer_norm"] = np.asarray(z).tolist()
                for k, v in rec.items():
                    per_segment.setdefault(k, []).append(v)
            else:
                out, state = forward(params, rest, inputs, targets, state)
            out = np.asarray(out, np.float64)
            nll[pos[valid]] = out[valid]
    if np.isnan(nll).any():
        raise RuntimeError(f"{int(np.isnan(nll).sum())} tokens were not scored")
    return nll, (per_segment if trace else None)


def _bucket_means(values: np.ndarray, keys: np.ndarray, edges) -> list[float | None]:
    out = []
    for lo, hi in itertools.pairwise(edges):
        sel = (keys >= lo) & (keys < hi)
        out.append(float(values[sel].mean()) if sel.any() else None)
    return out


def evaluate(run) -> dict:
    """Every evaluation of one trained run (see the module docstring)."""
    t = run.task.config.segment_len
    n = len(run.task.valid_tokens) - 1
    index = np.arange(n)
    seg_edges = [i * t // SEGMENT_BUCKETS for i in range(SEGMENT_BUCKETS + 1)]
    losses, by_segment_pos, by_distance, vs_segments = {}, {}, {}, {}
    stream_trace = None
    base = None
    for c in CHUNKS:
        chunk = None if c is None else c * t
        name = "stream" if chunk is None else str(chunk)
        t0 = time.time()
        nll, tr = chunked_nll(run, chunk, trace=chunk is None)
        if chunk == t:
            base = nll
        if tr is not None:
            stream_trace = tr
        distance = index if chunk is None else index % chunk
        losses[name] = float(nll.mean())
        by_segment_pos[name] = _bucket_means(nll, index % t, seg_edges)
        by_distance[name] = _bucket_means(nll, distance, DISTANCE_EDGES)
        if base is not None:
            vs_segments[name] = _bucket_means(nll - base, distance, DISTANCE_EDGES)
        print(f"  eval {name}: {losses[name]:.4f} nats ({time.time() - t0:.0f} s)", flush=True)
    return dict(
        loss=losses,
        segment_bucket_edges=seg_edges,
        by_segment_position=by_segment_pos,
        distance_edges=[*list(DISTANCE_EDGES[:-1]), n],
        by_distance=by_distance,
        minus_segments_by_distance=vs_segments,
        stream_trace=stream_trace,
    )


def training_memory(workdir: Path) -> list[dict]:
    """The memory diagnostics logged in training (per log step, per layer: mean over heads)."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") != "memory":
            continue
        out.append(
            dict(
                step=rec["step"],
                **{
                    stat: _layer_means(rec, stat)
                    for stat in ("state_norm_final", "retrieval_error", "retrieval_cosine")
                },
            )
        )
    return out


def training_curve(workdir: Path) -> list[dict]:
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") in ("train", "eval"):
            out.append(dict(step=rec["step"], split=rec["split"], loss=rec["loss"]))
    return out


def result_path(norm: str, carry: bool, seed: int, out: Path = OUT) -> Path:
    return out / f"{run_name(norm, carry, seed)}.json"


def run_one(
    norm: str,
    carry: bool,
    seed: int,
    *,
    runs: Path = RUNS,
    out: Path = OUT,
    extra: list[str] | None = None,
) -> dict:
    """Trains (or resumes), evaluates and records one member of a pair; returns its record."""
    import jax

    from fwjax.train.loop import Run, train

    config = make_config(norm, carry, seed, extra)
    workdir = runs / run_name(norm, carry, seed)
    t0 = time.time()
    summary = train(config, workdir)
    print(f"{run_name(norm, carry, seed)}: trained ({time.time() - t0:.0f} s)", flush=True)
    run = Run.restore(workdir)
    run.checkpointer.close()
    t1 = time.time()
    ev = evaluate(run)
    record = dict(
        name=run_name(norm, carry, seed),
        norm=norm,
        carry_state=carry,
        seed=seed,
        base_config=NORMS[norm][0],
        overrides=[*COMMON, *NORMS[norm][1], *(extra or [])],
        params=int(sum(x.size for x in jax.tree.leaves(run.state.params))),
        steps=config.steps,
        tokens=config.steps * config.batch_size * config.lm.segment_len,
        train_seconds=summary.get("seconds"),
        eval_seconds=round(time.time() - t1, 1),
        segments_nats=ev["loss"][str(config.lm.segment_len)],
        carried_nats=ev["loss"]["stream"],
        eval=ev,
        training_memory=training_memory(workdir),
        curve=training_curve(workdir),
    )
    write_json_atomic(result_path(norm, carry, seed, out), record)
    return record


# -- report -------------------------------------------------------------------------------------


def _fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def _mean_layers(x):
    return float(np.mean(x))


def report_text(records: list[dict]) -> str:
    """The Markdown tables of all records."""
    records = sorted(records, key=lambda r: (r["norm"], not r["carry_state"], r["seed"]))
    keys = list(records[0]["eval"]["loss"])  # segments, reset every L tokens ..., "stream"
    lines = [
        "# Carried memory on Tiny Shakespeare (char level)",
        "",
        "Written by `python -m experiments.lm_carried report` from "
        "`experiments/results/lm_carried/*.json`. Every model: the reference small-LM recipe "
        f"(4 layers, d 128, context 64, batch 12) for {_steps(records)}, no positional "
        "encoding, contiguous training streams; a pair differs only in `carry_state` (training "
        "with the memory carried across segments, gradients stopped at segment edges). "
        "Validation loss in nats per character over the whole validation split (111k chars): "
        "`segments` = independent 64-char segments, `reset L` = memory reset every L chars, "
        "`carried` = the whole split as one stream. ‖S‖ = ‖S‖_F of the carried memory "
        "(mean over layers and heads) after segment 1 / 10 / 100 / the last (1742) of the "
        "stream, and its maximum; retrieval error ‖v − v̄‖ averaged over the stream.",
        "",
        "| norm | carry-trained | seed | segments | "
        + " | ".join(f"reset {k}" for k in keys[1:-1])
        + " | carried | ‖S‖ 1 / 10 / 100 / last | max ‖S‖ | retr. error | train s |",
        "|---|---|---:|" + "---:|" * len(keys) + "---|---:|---:|---:|",
    ]
    for r in records:
        loss = r["eval"]["loss"]
        tr = r["eval"]["stream_trace"]
        sn = [_mean_layers(x) for x in tr["state_norm"]]
        marks = [sn[i] for i in (0, 9, 99) if i < len(sn)] + [sn[-1]]
        err = float(np.mean([_mean_layers(x) for x in tr["retrieval_error"]]))
        lines.append(
            f"| {r['norm']} | {'yes' if r['carry_state'] else 'no'} | {r['seed']} | "
            + " | ".join(_fmt(loss[k]) for k in keys)
            + " | "
            f"{' / '.join(f'{x:.1f}' for x in marks)} | {max(sn):.1f} | {err:.2f} | "
            f"{_fmt(r['train_seconds'], 0)} |"
        )
    lines += ["", "Pairs (mean ± std over seeds, nats/char):", ""]
    lines += [
        "| norm | seeds | no-carry: segments | no-carry: carried | carry: segments | "
        "carry: carried | carry carried − no-carry best |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for norm in sorted({r["norm"] for r in records}):
        cols, seeds = [], None
        mine = [r for r in records if r["norm"] == norm]
        by = {c: [r for r in mine if r["carry_state"] == c] for c in (0, 1)}
        paired = sorted({r["seed"] for r in by[0]} & {r["seed"] for r in by[1]})
        seeds = len(paired)
        for c in (0, 1):
            rs = [r for r in by[c] if r["seed"] in paired]
            for key in (keys[0], "stream"):
                xs = [r["eval"]["loss"][key] for r in rs]
                cols.append(_pm(xs))
        diffs = []
        for s in paired:
            a = next(r for r in by[0] if r["seed"] == s)["eval"]["loss"]
            b = next(r for r in by[1] if r["seed"] == s)["eval"]["loss"]
            diffs.append(b["stream"] - min(a[keys[0]], a["stream"]))
        lines.append(f"| {norm} | {seeds} | " + " | ".join(cols) + f" | {_pm(diffs, sign=True)} |")
    lines += [
        "",
        "Loss by distance from the last memory reset, minus the independent-segments loss on the "
        "same characters (negative: the longer memory helps there), for the whole-split stream; "
        f"distance buckets (chars): {_edges(records)}.",
        "",
        "| run | stream − segments, per distance bucket |",
        "|---|---|",
    ]
    for r in records:
        d = r["eval"]["minus_segments_by_distance"]["stream"]
        lines.append(f"| {r['name']} | " + " / ".join(_fmt(x, 3) for x in d) + " |")
    lines += [
        "",
        "Loss by position within a 64-char segment (8 buckets of 8 positions), independent "
        "segments vs carried stream:",
        "",
        "| run | segments | carried |",
        "|---|---|---|",
    ]
    for r in records:
        b = r["eval"]["by_segment_position"]
        lines.append(
            f"| {r['name']} | "
            + " / ".join(_fmt(x, 2) for x in b[keys[0]])
            + " | "
            + " / ".join(_fmt(x, 2) for x in b["stream"])
            + " |"
        )
    lines += [
        "",
        "‖S‖_F in training (mean over layers and heads, last batch of the logged step; a "
        "carry-trained run's memory is the carried one) at steps 50 and ¼, ½ and all of the "
        "run's steps:",
        "",
        "| run | ‖S‖ in training | retrieval error in training |",
        "|---|---|---|",
    ]
    for r in records:
        mem = {m["step"]: m for m in r["training_memory"]}
        n = r["steps"]
        steps = [s for s in sorted({50, n // 4, n // 2, n}) if s in mem]
        sn = " / ".join(f"{_mean_layers(mem[s]['state_norm_final']):.1f}" for s in steps)
        er = " / ".join(f"{_mean_layers(mem[s]['retrieval_error']):.2f}" for s in steps)
        lines.append(f"| {r['name']} | {sn} | {er} |")
    return "\n".join(lines) + "\n"


def _steps(records) -> str:
    runs = sorted({(r["steps"], r["tokens"]) for r in records})
    return " / ".join(f"{s} steps ({t / 1e6:.2f}M tokens)" for s, t in runs)


def _edges(records):
    e = records[0]["eval"]["distance_edges"] if records else []
    return ", ".join(f"[{a}, {b})" for a, b in itertools.pairwise(e))


def _pm(xs, sign=False):
    if not xs:
        return "—"
    f = "+.3f" if sign else ".3f"
    if len(xs) == 1:
        return format(xs[0], f)
    return f"{format(float(np.mean(xs)), f)} ± {float(np.std(xs, ddof=1)):.3f}"


def write_plot(records: list[dict], path: Path) -> None:
    """‖S‖_F (mean over layers and heads) over training and over the validation stream, and the
    stream's loss minus the independent-segments loss by distance from the start; seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    norms = sorted({r["norm"] for r in records})
    colors = {n: f"C{i}" for i, n in enumerate(norms)}
    for r in records:
        if r["seed"] != 0:
            continue
        style = dict(color=colors[r["norm"]], ls="-" if r["carry_state"] else "--")
        label = f"{r['norm']} {'carry' if r['carry_state'] else 'no carry'}"
        tm = r["training_memory"]
        axes[0].plot(
            [m["step"] for m in tm], [np.mean(m["state_norm_final"]) for m in tm], **style
        )
        sn = [np.mean(x) for x in r["eval"]["stream_trace"]["state_norm"]]
        axes[1].plot(np.arange(1, len(sn) + 1), sn, label=label, **style)
        d = r["eval"]["minus_segments_by_distance"]["stream"]
        edges = r["eval"]["distance_edges"]
        pts = [
            (math.sqrt(max(lo, 1) * hi), v)
            for (lo, hi), v in zip(itertools.pairwise(edges), d, strict=True)
            if v is not None
        ]
        axes[2].plot(*zip(*pts, strict=True), marker="o", **style)
    axes[0].set(xlabel="training step", ylabel="‖S‖_F (last training batch)", yscale="log")
    axes[1].set(
        xlabel="segment of the validation stream", ylabel="‖S‖_F carried", xscale="log",
        yscale="log",
    )  # fmt: skip
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set(
        xlabel="characters since the stream's start", ylabel="carried − segments (nats)",
        xscale="log",
    )  # fmt: skip
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path = OUT, report: Path = REPORT) -> None:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not records:
        return
    write_plot(records, report.with_suffix(".png"))
    findings = ""
    if report.is_file():
        old = report.read_text()
        if FINDINGS_MARK in old:
            findings = old[old.index(FINDINGS_MARK) :]
    text = report_text(records)
    report.write_text(text + ("\n" + findings if findings else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.lm_carried")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--norms", default="sum,l2,centered_l2")
    r.add_argument("--seeds", default="0")
    r.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    sub.add_parser("report")
    args = p.parse_args(argv)
    if args.cmd == "report":
        write_report()
        return 0
    for seed in (int(s) for s in args.seeds.split(",")):
        for norm in args.norms.split(","):
            for carry in (True, False):
                if result_path(norm, carry, seed).is_file():
                    print(f"{run_name(norm, carry, seed)}: done, skipped", flush=True)
                    continue
                t0 = time.time()
                rec = run_one(norm, carry, seed, extra=args.set)
                print(
                    f"{rec['name']}: segments {rec['segments_nats']:.4f}, carried "
                    f"{rec['carried_nats']:.4f} nats ({time.time() - t0:.0f} s)",
                    flush=True,
                )
                write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
