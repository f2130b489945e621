"""The normalisation study (beyond the paper): write/remove balance and growth of fast weights.

::

    python -m experiments.normalisation synthetic [--ns 40,80] [--max-steps 6000]
    python -m experiments.normalisation lm [--runs runs/lm_ts]
    python -m experiments.normalisation report

The paper (Schlag et al., 2021, Sec. 4.2) argues that (a) attention normalisation cannot
balance writing and removing, and (b) accumulating positive values makes fast weights grow
without bound over many steps; it proposes sum normalisation. This study measures both, for

* ``sum_attention``: sum rule + attention normalisation (the linear transformer),
* ``delta_attention``: delta rule + attention normalisation,
* ``delta_sum``: delta rule + sum normalisation (the paper's),
* ``delta_l2``: delta rule + L2 normalisation (DeltaNet, 2024),
* ``delta_centered_l2``: delta rule + centred L2 normalisation (fwjax's own,
  :func:`fwjax.ops.feature_maps.centered_l2_norm`),

on two problems:

``synthetic``: the update task (setting 2 of :mod:`experiments.synthetic`, DPFP-1 keys,
``d_dot = 128``) at each N, trained with the paper's protocol, then replayed step by step on 20
fresh sequences of length ``2N``, ``8N`` and ``32N`` (the same N keys overwritten 1, 4 and 16
times as often as in training). Per write ``t`` of a key seen before with another value
(an overwrite; ``e_old`` / ``e_new`` its old and new one-hot values):

* ``removal_cosine``: ``cos(v̄_t, e_old)``, ``v̄_t`` the memory's retrieval for ``k̂_t`` before
  the write (divided by ``z_{t-1}·k̂_t`` under attention normalisation): does the memory return
  the value the write must remove?
* ``new_weight`` / ``old_weight``: the memory read at ``k̂_t`` right after the write (as the
  model reads, i.e. divided by ``z_t·k̂_t`` under attention normalisation), at ``e_new`` and at
  ``e_old``: 1 / 0 is a complete overwrite, equal weights a memory that cannot remove;
* ``state_norm``: ``‖S_t‖_F`` over the whole sequence (its growth answers (b));
* the task loss at each length, read from the final memory at every unique key.

``lm``: the Tiny Shakespeare models of :mod:`experiments.lm` (``linear``, ``delta``,
``delta_dpfp2``, ``delta_attention``, ``delta_l2``, ``delta_centered_l2``; trained with
carried memory) run over
the whole validation text as ONE stream with the memory carried across all ~435 segments;
per segment: bits per character with the carried memory and from an empty one (the same
segment alone) and, per layer (mean over heads), ``‖S‖_F`` at its end,
the mean retrieval cosine ``cos(v̄_t, v_t)``, retrieval error ``‖v_t − v̄_t‖`` and β
(:mod:`fwjax.diagnostics`).

Each finished unit is one JSON under ``experiments/results/normalisation/`` (resumable: present
files are skipped); ``report`` (also run after each unit) writes ``normalisation.md`` (tables)
and ``normalisation.png`` (plots) in ``experiments/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.records import write_json_atomic
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask, retrieval_loss
from fwjax.diagnostics import replay_writes
from fwjax.nn.config import FastWeightConfig
from fwjax.nn.retrieval import RetrievalConfig
from fwjax.ops import FeatureMap, FeatureMapKind, Normalization, UpdateRule
from fwjax.train.retrieval import memory_writes, retrieval_train_config, run_retrieval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
OUT = RESULTS / "normalisation"

# label -> (update rule, normalisation)
CONFIGS: dict[str, tuple[UpdateRule, Normalization]] = {
    "sum_attention": (UpdateRule.SUM, Normalization.ATTENTION),
    "delta_attention": (UpdateRule.DELTA, Normalization.ATTENTION),
    "delta_sum": (UpdateRule.DELTA, Normalization.SUM),
    "delta_l2": (UpdateRule.DELTA, Normalization.L2),
    "delta_centered_l2": (UpdateRule.DELTA, Normalization.CENTERED_L2),
}
FEATURE_MAP = FeatureMap(FeatureMapKind.DPFP, nu=1)
D_KEY = 64
LENGTH_FACTORS = (1, 4, 16)  # replay lengths, in multiples of the training length 2N
EVAL_SEQUENCES = 20
TRACE_POINTS = 128  # ‖S_t‖ curves are stored subsampled to about this many points
# LM run name (experiments/lm.py variant) -> study label
LM_RUNS = {
    "linear": "sum_attention",
    "delta_attention": "delta_attention",
    "delta": "delta_sum",
    "delta_dpfp2": "delta_sum",  # DPFP-2 instead of ELU+1 (the paper's variant)
    "delta_l2": "delta_l2",
    "delta_centered_l2": "delta_centered_l2",
}


# ----------------------------------------------------------------------------------------------
# Synthetic update task
# ----------------------------------------------------------------------------------------------


# The memory replayed step by step, compiled once per (shapes, normalisation).
_replay = jax.jit(replay_writes, static_argnames=("attention_normalized", "read_after"))


def previous_values(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``prev[b, t]``: the value last written under ``keys[b, t]`` before step t, or -1."""
    prev = np.full(keys.shape, -1, np.int64)
    for b in range(keys.shape[0]):
        last: dict[int, int] = {}
        for t, (k, val) in enumerate(zip(keys[b], values[b], strict=True)):
            prev[b, t] = last.get(int(k), -1)
            last[int(k)] = int(val)
    return prev


def analyse_memory(model, task: RetrievalTask, seed: int) -> dict:
    """The write/remove balance, growth and loss of a trained model on fresh sequences of
    ``task`` (see the module docstring)."""
    batch = task.batch(seed, 10_000, EVAL_SEQUENCES, eval=True)
    fk, beta, fq = memory_writes(model, batch["keys"], batch["values"], batch["queries"])
    norm = model.config.fast_weight.normalization
    v = jax.nn.one_hot(batch["values"], task.num_values, dtype=jnp.float32)
    head = lambda x: None if x is None else x[:, :, None]  # one head: [B, L, 1, .]
    r = _replay(
        head(fk), head(v), head(beta), attention_normalized=norm.uses_normalizer, read_after=True
    )
    v_bar, read, state_norm = r.retrieved[:, :, 0], r.read_after[:, :, 0], r.state_norm[:, :, 0]
    s, z = r.final_state[:, 0], r.final_normalizer[:, 0]
    # The model's read-out from the final memory (fast_weight_read): q̂ᵀS (/ (z·q̂ + eps)).
    y = jnp.einsum("bqk,bkv->bqv", fq, s)
    if norm.uses_normalizer:
        y = y / (jnp.einsum("bqk,bk->bq", fq, z) + 1e-5)[..., None]
    loss = float(retrieval_loss(y, batch["targets"], batch["mask"]))
    v_bar, read = np.asarray(v_bar), np.asarray(read)
    values = batch["values"]
    prev = previous_values(batch["keys"], values)
    over = (prev >= 0) & (prev != values)  # overwrites with a different value
    first = prev < 0
    bi, ti = np.nonzero(over)
    old, new = prev[bi, ti], values[bi, ti]
    vb = v_bar[bi, ti]
    cos = vb[np.arange(len(old)), old] / np.maximum(np.linalg.norm(vb, axis=-1), 1e-30)
    sn = np.asarray(state_norm).mean(axis=0)
    stride = max(1, len(sn) // TRACE_POINTS)
    return dict(
        length=task.length,
        loss=loss,
        overwrites=int(over.sum()),
        removal_cosine=float(cos.mean()),
        new_weight=float(read[bi, ti, new].mean()),
        old_weight=float(read[bi, ti, old].mean()),
        first_write_retrieval_norm=float(np.linalg.norm(v_bar[first], axis=-1).mean()),
        beta_mean=None if beta is None else float(jnp.mean(beta)),
        state_norm_final=float(sn[-1]),
        state_norm_trace=[[int(t + 1), float(sn[t])] for t in range(stride - 1, len(sn), stride)],
    )


def synthetic_point(label: str, n: int, max_steps: int, seed: int = 0) -> dict:
    """Trains one configuration on the update task with N keys and analyses its memory."""
    rule, norm = CONFIGS[label]
    fw = FastWeightConfig(feature_map=FEATURE_MAP, normalization=norm, update_rule=rule)
    task = RetrievalTask(RetrievalSetting.UPDATE, n)
    model = RetrievalConfig(n, n, d_key=D_KEY, fast_weight=fw)
    fields = {"seed": seed, "steps": max_steps, "optimizer.clip_norm": None}
    result = run_retrieval(retrieval_train_config(task, model, fields))
    replays = [
        analyse_memory(
            result.model,
            dataclasses.replace(task, sequence_length=f * task.length),
            seed=seed + 1,
        )
        for f in LENGTH_FACTORS
    ]
    return dict(
        kind="synthetic",
        config=label,
        update_rule=rule.value,
        normalization=norm.value,
        feature_map="dpfp1",
        n_keys=n,
        final_eval_loss=result.final_eval_loss,
        steps=result.steps,
        stop_reason=result.stop_reason.value,
        seconds=round(result.seconds, 1),
        device=jax.default_backend(),
        seed=seed,
        replays=replays,
    )


# ----------------------------------------------------------------------------------------------
# Language model with carried memory
# ----------------------------------------------------------------------------------------------


def lm_point(run_name: str, runs: Path, max_segments: int | None = None) -> dict:
    """Carried-memory pass of a trained Tiny Shakespeare model over its whole validation text
    (or its first ``max_segments`` segments), one stream, with per-segment loss and per-layer
    memory diagnostics."""
    from flax import nnx

    from fwjax.nn.attention import FastWeightAttention
    from fwjax.train import Run

    workdir = runs / run_name
    run = Run.restore(workdir)
    run.checkpointer.close()
    task = run.task
    t = task.config.segment_len
    tokens = np.asarray(task.valid_tokens)
    n_seg = (len(tokens) - 1) // t
    if max_segments is not None:
        n_seg = min(n_seg, max_segments)
    model_def = run.model_def

    @jax.jit
    def score(params, rest, inputs, targets, state):
        model = model_def.merge(params, rest, train=False)
        for _, layer in nnx.iter_graph(model):
            if isinstance(layer, FastWeightAttention):
                layer.config = dataclasses.replace(layer.config, diagnostics=True)
        (logits, new_state), sown = nnx.capture(lambda m: m(inputs, state), nnx.Intermediate)(model)
        nll = jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32))[0, jnp.arange(t), targets[0]])
        return -nll, new_state, nnx.to_pure_dict(sown)

    empty = run.model().init_state(1)
    state = empty
    per_segment = []
    start = time.perf_counter()
    bits = t * math.log(2)
    for i in range(n_seg):
        seg = tokens[i * t : i * t + t + 1]
        inputs = jnp.asarray(seg[None, :-1], jnp.int32)
        targets = jnp.asarray(seg[None, 1:], jnp.int32)
        nll, state, sown = score(run.state.params, run.state.rest, inputs, targets, state)
        # The same segment from an empty memory: what carrying the memory changes here.
        nll_reset, _, _ = score(run.state.params, run.state.rest, inputs, targets, empty)
        per_segment.append(
            dict(
                bpc=float(nll) / bits,
                bpc_reset=float(nll_reset) / bits,
                layers=_layer_stats(sown),
            )
        )
    return dict(
        kind="lm",
        run=run_name,
        config=LM_RUNS[run_name],
        segment_len=t,
        segments=n_seg,
        carried_bpc=float(np.mean([s["bpc"] for s in per_segment])),
        reset_bpc=float(np.mean([s["bpc_reset"] for s in per_segment])),
        seconds=round(time.perf_counter() - start, 1),
        per_segment=per_segment,
    )


def _layer_stats(sown) -> list[dict]:
    """Per layer (in order), the head-mean of each diagnostic of the segment."""
    found = []

    def visit(path, tree):
        if isinstance(tree, dict):
            if "memory" in tree:
                found.append((path, tree["memory"]))
            for key, sub in tree.items():
                if key != "memory":
                    visit((*path, str(key)), sub)

    visit((), sown)
    out = []
    for _, mem in sorted(found, key=lambda x: [int(p) if p.isdigit() else p for p in x[0]]):
        stats = mem[0] if isinstance(mem, tuple | list) else mem
        out.append({k: float(jnp.mean(jnp.asarray(val))) for k, val in stats.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def _write(path: Path, record: dict) -> None:
    write_json_atomic(path, record)


def _records(kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{kind}_*.json"))]


def report() -> None:
    """Rewrites ``normalisation.md`` and ``normalisation.png`` from the finished units."""
    order = {label: i for i, label in enumerate(CONFIGS)}
    syn = sorted(_records("synthetic"), key=lambda r: (r["n_keys"], order[r["config"]]))
    lms = sorted(_records("lm"), key=lambda r: (order[r["config"]], r["run"]))
    lines = []
    if syn:
        lines += [
            "Synthetic update task (DPFP-1 keys, d_dot = 128): trained at L = 2N, replayed at "
            "L = 2N / 8N / 32N (20 fresh sequences).",
            "",
            "| N | config | train loss (steps) | loss 2N / 8N / 32N | removal cos | "
            "new / old weight | ‖S‖ at 2N / 8N / 32N | β mean |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in syn:
            rp = r["replays"]
            beta = "—" if rp[0]["beta_mean"] is None else f"{rp[0]['beta_mean']:.2f}"
            lines.append(
                f"| {r['n_keys']} | {r['config']} | {r['final_eval_loss']:.4f} ({r['steps']}) | "
                + " / ".join(f"{x['loss']:.3f}" for x in rp)
                + f" | {rp[0]['removal_cosine']:.2f} | "
                f"{rp[0]['new_weight']:.2f} / {rp[0]['old_weight']:.2f} | "
                + " / ".join(f"{x['state_norm_final']:.1f}" for x in rp)
                + f" | {beta} |"
            )
    if lms:
        lines += [
            "",
            "Tiny Shakespeare, memory carried over the whole validation text (one stream): "
            "bits per character and, averaged over layers and heads, ‖S‖_F at the end of the "
            "first / last segment, the retrieval cosine cos(v̄_t, v_t) and error ‖v_t − v̄_t‖.",
            "",
            "| run | config | carried bpc | reset bpc | carried − reset, first 10% / last 10% "
            "of segments | ‖S‖ first / last | max ‖S‖ | retrieval cos | retrieval error |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in lms:
            seg = r["per_segment"]
            tenth = max(1, len(seg) // 10)
            norm = [np.mean([x["state_norm_final"] for x in s["layers"]]) for s in seg]
            cos = np.mean([np.mean([x["retrieval_cosine"] for x in s["layers"]]) for s in seg])
            err = np.mean([np.mean([x["retrieval_error"] for x in s["layers"]]) for s in seg])
            gain = [s["bpc"] - s["bpc_reset"] for s in seg]
            head, tail = np.mean(gain[:tenth]), np.mean(gain[-tenth:])
            lines.append(
                f"| {r['run']} | {r['config']} | {r['carried_bpc']:.4f} | "
                f"{r['reset_bpc']:.4f} | {head:+.3f} / {tail:+.3f} | {norm[0]:.4g} / "
                f"{norm[-1]:.4g} | {max(norm):.4g} | {cos:.3f} | {err:.3f} |"
            )
    if not lines:
        return
    (RESULTS / "normalisation.md").write_text("\n".join(lines) + "\n")
    _plot(syn, lms)


def _plot(syn: list[dict], lms: list[dict]) -> None:
    """``normalisation.png``: 2 × 2 panels (update task: ‖S_t‖ over writes, loss against
    length; Tiny Shakespeare: carried ‖S‖ and carried − reset bpc), one legend under them."""
    from experiments.plotting import MAX_WIDTH_IN, legend_below, log_ticks, style

    with style() as plt:
        colors = dict(zip(CONFIGS, plt.get_cmap("tab10").colors, strict=False))
        fig, axes = plt.subplots(2, 2, figsize=(MAX_WIDTH_IN, 9.0), layout="constrained")
        (trace, length), (norm_ax, gain_ax) = axes
        # One legend entry per config, naming its LM run where the name differs; the dotted
        # delta_dpfp2 run (delta_sum with DPFP-2 keys) gets its own.
        lm_run = {r["config"]: r["run"] for r in lms if r["run"] != "delta_dpfp2"}
        labels = {c: c if lm_run.get(c, c) == c else f"{c} (LM: {lm_run[c]})" for c in CONFIGS}
        ns = sorted({r["n_keys"] for r in syn})
        if ns:
            n = ns[-1]
            for r in (r for r in syn if r["n_keys"] == n):
                pts = r["replays"][-1]["state_norm_trace"]
                trace.plot(
                    *zip(*pts, strict=True), color=colors[r["config"]], label=labels[r["config"]]
                )
                lengths = [x["length"] for x in r["replays"]]
                length.plot(
                    lengths,
                    [x["loss"] for x in r["replays"]],
                    marker="o",
                    color=colors[r["config"]],
                    label=labels[r["config"]],
                )
            trace.set(
                title=f"update task, N = {n}: ‖S_t‖_F over {pts[-1][0]} writes",
                xlabel="write step t",
                ylabel="‖S_t‖_F (mean over sequences)",
                yscale="log",
            )
            length.set(
                title=f"update task, N = {n}: loss vs length (trained at {2 * n})",
                xlabel="sequence length L",
                ylabel="loss",
                xscale="log",
                yscale="log",
            )
            log_ticks(length.xaxis, lengths)
        for r in lms:
            norm = [np.mean([x["state_norm_final"] for x in s["layers"]]) for s in r["per_segment"]]
            x = np.arange(1, len(norm) + 1) * r["segment_len"] / 1000
            style_ = ":" if r["run"] == "delta_dpfp2" else "-"
            if r["run"] == "delta_dpfp2":
                label = "delta_dpfp2 (LM only: delta_sum, DPFP-2 keys)"
            else:
                label = labels[r["config"]]
            norm_ax.plot(x, norm, style_, color=colors[r["config"]], label=label)
            gain = np.asarray([s["bpc"] - s["bpc_reset"] for s in r["per_segment"]])
            window = min(20, len(gain))
            smooth = np.convolve(gain, np.ones(window) / window, mode="valid")
            gain_ax.plot(x[window - 1 :], smooth, style_, color=colors[r["config"]], label=label)
        gain_ax.axhline(0.0, color="k", lw=0.8)
        norm_ax.set(
            title="Tiny Shakespeare, carried memory: ‖S‖_F",
            xlabel="characters read (thousands)",
            ylabel="‖S‖_F (mean over layers, heads)",
            yscale="log",
        )
        gain_ax.set(
            title="carried − reset memory (20-segment mean)",
            xlabel="characters read (thousands)",
            ylabel="Δ bits/char (< 0: carrying helps)",
        )
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        legend_below(fig, axes.flat, ncol=3)
        fig.savefig(RESULTS / "normalisation.png")
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synthetic", help="train + analyse the update task per config and N")
    p.add_argument("--ns", default="40,80")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--max-steps", type=int, default=6000)
    p = sub.add_parser("lm", help="carried-memory diagnostics of the trained LM runs")
    p.add_argument("--runs", default="runs/lm_ts")
    p.add_argument("--only", default=",".join(LM_RUNS))
    sub.add_parser("report", help="rewrite the table and plot")
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        labels = [c for c in args.configs.split(",") if c]
        unknown = sorted(set(labels) - set(CONFIGS))
        if unknown:
            parser.error(f"unknown configs {unknown}; valid: {list(CONFIGS)}")
        for n in (int(x) for x in args.ns.split(",")):
            for label in labels:
                path = OUT / f"synthetic_n{n}_{label}.json"
                if path.exists():
                    continue
                record = synthetic_point(label, n, args.max_steps)
                _write(path, record)
                rp = record["replays"]
                print(
                    f"N={n} {label}: loss {record['final_eval_loss']:.4f} "
                    f"({record['steps']} steps, {record['seconds']:.0f} s); replay losses "
                    + ", ".join(f"{x['loss']:.3f}" for x in rp),
                    flush=True,
                )
                report()
    elif args.command == "lm":
        os.chdir(ROOT)
        for name in (x for x in args.only.split(",") if x):
            path = OUT / f"lm_{name}.json"
            if path.exists() or not (Path(args.runs) / name / "checkpoints").is_dir():
                print(f"{name}: {'done' if path.exists() else 'no trained run'}, skipped")
                continue
            record = lm_point(name, Path(args.runs))
            _write(path, record)
            print(f"{name}: carried bpc {record['carried_bpc']:.4f}", flush=True)
            report()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
