"""The training step's cost: the full ``train_step`` of ``fwjax.train`` (forward, backward, AdamW
update, non-finite guard) on language models, timed as ``fwjax train`` runs it.

Sections (each row is written to the results file as soon as it is measured; a rerun skips the
rows already there):

- ``length``: time per token of a delta-rule LM and its softmax twin as the segment length T
  grows at a fixed number of tokens per step (B·T), and their ratio: where the fast weight
  layer overtakes softmax attention.
- ``remat``: per :class:`~fwjax.nn.Remat` policy, the bytes kept for the backward pass (the
  residuals of ``jax.vjp`` of the loss), XLA's temporary buffer size of the compiled step, and
  the step time.
- ``compile``: compile time of the train step of a deep model (``--layers``, default 24) with
  its layers unrolled vs scanned (``scan_layers``), and the step time of both.
- ``parts``: the forward pass, forward + backward (``jax.value_and_grad``) and the full step,
  the non-finite guard's select over parameters and optimizer state alone, and model FLOPs/s
  against an in-run 2048³ float32 matmul (MFU on this machine).
- ``packed``: the step with packed documents (``lm.document_separator``: each line of the
  generated text, ≈ 80 bytes, is a document) against the same windows unpacked, for the delta
  rule's RECURRENT and CHUNKED forms and softmax attention.
- ``profile``: a ``jax.profiler`` trace of steps of the delta-rule (CHUNKED) and softmax models;
  the XLA ops that took the most time, grouped by their JAX op names (from the compiled HLO's
  metadata), summed over the traced steps.

Usage::

    python -m benchmarks.train_step                      # CPU sizes, ~10 min on 2 cores
    python -m benchmarks.train_step --sections length --lengths 512,1024
    python -m benchmarks.train_step --table-only

Timing: two warm-up calls (compilation), then ``--repeats`` synchronised calls; median and the
interquartile range. Results: ``benchmarks/results/train_step_<backend>.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# The reduced CPU model: d_model 128 with 2 heads of 64 (the head size of the 125M model).
BASE = dict(d_model=128, num_heads=2, d_ff=512, vocab=256)


def _timed(fn, repeats: int) -> dict:
    """Median and interquartile range (seconds) of ``repeats`` synchronised calls after two
    warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return dict(median_s=float(med), iqr_s=float(q3 - q1), repeats=repeats)


def _config(kind: str, t: int, batch: int, layers: int, extra=()):
    """A byte-level LM config of ``kind`` (``delta`` or ``softmax``) on generated text."""
    from fwjax.train.config_io import load_train_config

    kinds = json.dumps([{"delta": "fast_weight", "softmax": "softmax"}[kind]] * layers)
    return load_train_config(
        "lm_tiny",
        [
            f"batch_size={batch}",
            f"lm.segment_len={t}",
            f"lm.model.num_layers={layers}",
            f"lm.model.layer_kinds={kinds}",
            "lm.carry_state=false",
            f"lm.model.d_model={BASE['d_model']}",
            f"lm.model.num_heads={BASE['num_heads']}",
            f"lm.model.d_ff={BASE['d_ff']}",
            f"lm.model.max_len={max(t, 128)}",
            "lm.model.dropout=0.0",
            "mesh.data=1",
            "progress_bar=false",
            *extra,
        ],
    )


@contextlib.contextmanager
def _run(config):
    """A built :class:`fwjax.train.Run` in a temporary work directory."""
    from fwjax.train import Run

    with tempfile.TemporaryDirectory() as workdir:
        run = Run(config, workdir, jax.devices()[:1])
        try:
            yield run
        finally:
            run.checkpointer.close()


def _step_timer(run):
    """A callable running one training step (the state is carried, as in the loop)."""
    batch = run.batch(0)

    def call():
        run.state, metrics = run.train_step(run.state, batch)
        return metrics["step_loss"]

    return call


def _num_params(run) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params))


def model_flops_per_token(config, num_params: int) -> float:
    """Training FLOPs per token: ``6·N`` for the parameters' matrix products plus the token
    mixers' (forward ×3 for forward + backward): causal softmax attention ``2·T·d`` per layer
    (half of the ``4·T·d`` of the full score and value products), the delta rule's recurrence
    ``6·K·V`` per head (the state read, the delta write and the query read)."""
    model = config.lm.model
    t, d, h = config.lm.segment_len, model.d_model, model.num_heads
    mixer = 0.0
    for kind in model.layer_kinds:
        if kind.value == "softmax":
            mixer += 3 * 2 * t * d
        else:
            k = model.fast_weight.feature_map.output_dim(d // h)
            mixer += 3 * 6 * k * (d // h) * h
    return 6 * num_params + mixer


def _matmul_peak(repeats: int = 10) -> float:
    """FLOP/s of a 2048³ float32 matmul (this machine's practical peak)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    stats = _timed(lambda: f(a), repeats)
    return 2 * 2048**3 / stats["median_s"]


def section_length(args, done, write):
    tokens = args.tokens
    for t in args.lengths:
        for kind in ("delta", "softmax"):
            key = f"length|{kind}|T{t}"
            if key in done:
                continue
            config = _config(kind, t, max(tokens // t, 1), args.length_layers)
            with _run(config) as run:
                stats = _timed(_step_timer(run), args.repeats)
                b = config.batch_size
                row = dict(key=key, section="length", kind=kind, t=t, batch=b, **stats)
                row["us_per_token"] = 1e6 * stats["median_s"] / (b * t)
                row["flops_per_token"] = model_flops_per_token(config, _num_params(run))
            write(row)


def _residual_bytes(run) -> int:
    """Bytes the loss's gradient keeps for the backward pass (shapes only)."""
    from flax import nnx

    model = run.model(train=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = run.task.train_batch(0)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        return run.task.loss(m, batch, None)[0]

    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def section_remat(args, done, write):
    for kind in ("delta", "softmax"):
        for remat in ("none", "full", "dots", "fast_weight"):
            key = f"remat|{kind}|{remat}"
            if key in done:
                continue
            config = _config(kind, args.remat_t, args.remat_batch, 4, [f"lm.model.remat={remat}"])
            with _run(config) as run:
                compiled = run.train_step.lower(run.state, run.batch(0)).compile()
                memory = compiled.memory_analysis()
                row = dict(key=key, section="remat", kind=kind, remat=remat)
                row["residual_mib"] = _residual_bytes(run) / 2**20
                row["xla_temp_mib"] = memory.temp_size_in_bytes / 2**20
                row.update(_timed(_step_timer(run), args.repeats))
            write(row)


def section_compile(args, done, write):
    for scan in (False, True):
        key = f"compile|delta|L{args.layers}|scan={scan}"
        if key in done:
            continue
        extra = [f"lm.model.scan_layers={str(scan).lower()}", "lm.model.d_model=64"]
        config = _config("delta", 128, 4, args.layers, extra)
        with _run(config) as run:
            batch = run.batch(0)
            start = time.perf_counter()
            lowered = run.train_step.lower(run.state, batch)
            lower_s = time.perf_counter() - start
            lowered.compile()
            compile_s = time.perf_counter() - start - lower_s
            row = dict(key=key, section="compile", layers=args.layers, scan=scan)
            row.update(lower_s=lower_s, compile_s=compile_s)
            row.update(_timed(_step_timer(run), args.repeats))
        write(row)


def section_parts(args, done, write):
    from flax import nnx

    from fwjax.train.step import _select

    key = "parts|matmul_peak"
    if key not in done:
        write(dict(key=key, section="parts", flops_per_s=_matmul_peak()))
    for kind in ("delta", "softmax"):
        key = f"parts|{kind}"
        if key in done:
            continue
        config = _config(kind, args.remat_t, args.remat_batch, 4)
        with _run(config) as run:
            batch = run.task.train_batch(0)
            model = run.model(train=True)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(params, graphdef=graphdef, rest=rest, batch=batch, task=run.task):
                return task.loss(nnx.merge(graphdef, params, rest), batch, None)[0]

            forward = jax.jit(loss)
            grad = jax.jit(jax.value_and_grad(loss))
            state = run.state
            select = jax.jit(
                lambda s: _select(jnp.bool_(True), (s.params, s.opt_state), (s.params, s.opt_state))
            )
            row = dict(key=key, section="parts", kind=kind)
            row["forward"] = _timed(functools.partial(forward, params), args.repeats)
            row["value_and_grad"] = _timed(functools.partial(grad, params), args.repeats)
            row["guard_select"] = _timed(functools.partial(select, state), args.repeats)
            row["train_step"] = _timed(_step_timer(run), args.repeats)
            tokens = config.batch_size * config.lm.segment_len
            row["tokens"] = tokens
            row["num_params"] = _num_params(run)
            row["flops_per_token"] = model_flops_per_token(config, row["num_params"])
        write(row)


PACKED_MODELS = {
    "delta_recurrent": ("delta", ['lm.model.fast_weight.impl="recurrent"']),
    "delta_chunked": ("delta", ['lm.model.fast_weight.impl="chunked"']),
    "softmax": ("softmax", []),
}


def section_packed(args, done, write):
    for t in (512, 2048):
        for name, (kind, extra) in PACKED_MODELS.items():
            for packed in (False, True):
                key = f"packed|{name}|T{t}|{packed}"
                if key in done:
                    continue
                sep = ['lm.document_separator="\\n"'] if packed else []
                config = _config(kind, t, max(args.tokens // t, 1), 2, [*extra, *sep])
                with _run(config) as run:
                    stats = _timed(_step_timer(run), args.repeats)
                    docs = None
                    if packed:
                        ids = np.asarray(run.batch(0)["segment_ids"])
                        docs = float(np.mean(ids.max(axis=1) + 1))
                write(
                    dict(
                        key=key,
                        section="packed",
                        model=name,
                        t=t,
                        packed=packed,
                        docs=docs,
                        **stats,
                    )
                )


def _hlo_op_names(compiled_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op name of its metadata (where the op came from)."""
    pattern = r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"'
    return {m.group(1): m.group(2) for m in re.finditer(pattern, compiled_text, re.M)}


def _op_group(op_name: str) -> str:
    """A readable group of a JAX op name: the path without the step's own prefix and the
    loops' bodies (``transpose(...)`` marks the backward pass)."""
    name = op_name.removeprefix("jit(train_step)/")
    name = re.sub(r"/while/body(/closed_call)?", "/while", name)
    return name


def _hlo_op_times(trace_dir: Path, names: dict[str, str]) -> dict[str, float]:
    """Total duration (s) per op group of the XLA ops (events with an ``hlo_op``) of a
    Perfetto trace written by ``jax.profiler.trace(..., create_perfetto_trace=True)``."""
    import gzip

    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    with gzip.open(path) as f:
        events = json.loads(f.read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[str, float] = {}
    for e in events:
        hlo_op = e.get("args", {}).get("hlo_op")
        if e.get("ph") != "X" or hlo_op is None:
            continue
        group = _op_group(names.get(hlo_op, hlo_op))
        totals[group] = totals.get(group, 0.0) + e["dur"] * 1e-6
    return totals


PROFILED = {
    "delta (CHUNKED)": ("delta", ['lm.model.fast_weight.impl="chunked"']),
    "softmax": ("softmax", []),
}


def section_profile(args, done, write):
    steps = 3
    for name, (kind, extra) in PROFILED.items():
        key = f"profile|{name}"
        if key in done:
            continue
        config = _config(kind, 1024, 8, 2, extra)
        with _run(config) as run, tempfile.TemporaryDirectory() as trace_dir:
            call = _step_timer(run)
            step = _timed(call, 5)
            names = _hlo_op_names(run.train_step.lower(run.state, run.batch(0)).compile().as_text())
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(steps):
                    jax.block_until_ready(call())
            totals = _hlo_op_times(Path(trace_dir), names)
        total = sum(totals.values())
        fast_weight = sum(v for k, v in totals.items() if "fast_weight_attention" in k)
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
        write(
            dict(
                key=key,
                section="profile",
                model=name,
                t=1024,
                batch=8,
                steps=steps,
                step=step,
                op_s=total,
                fast_weight_op_s=fast_weight,
                top=[dict(name=n, s=v) for n, v in top],
            )
        )


SECTIONS = dict(
    length=section_length,
    remat=section_remat,
    compile=section_compile,
    parts=section_parts,
    packed=section_packed,
    profile=section_profile,
)


def _fmt_ms(stats: dict) -> str:
    return f"{1e3 * stats['median_s']:.1f} ± {1e3 * stats['iqr_s'] / 2:.1f}"


def _header(*columns: str) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def table(rows: list[dict]) -> str:
    """Markdown tables of the measured rows."""
    by = {r["key"]: r for r in rows}
    out = []
    lengths = sorted({r["t"] for r in rows if r["section"] == "length"})
    if lengths:
        out += _header("T", "B", "delta µs/token", "softmax µs/token", "delta / softmax")
        for t in lengths:
            d, s = by.get(f"length|delta|T{t}"), by.get(f"length|softmax|T{t}")
            if d and s:
                ratio = d["us_per_token"] / s["us_per_token"]
                out.append(
                    f"| {t} | {d['batch']} | {d['us_per_token']:.2f} | {s['us_per_token']:.2f} "
                    f"| {ratio:.2f} |"
                )
        out.append("")
    remat = [r for r in rows if r["section"] == "remat"]
    if remat:
        out += _header("model", "remat", "kept for backward MiB", "XLA temp MiB", "step ms")
        for r in remat:
            out.append(
                f"| {r['kind']} | {r['remat']} | {r['residual_mib']:.1f} | "
                f"{r['xla_temp_mib']:.1f} | {_fmt_ms(r)} |"
            )
        out.append("")
    comp = [r for r in rows if r["section"] == "compile"]
    if comp:
        out += _header("layers", "scan", "trace+lower s", "compile s", "step ms")
        for r in comp:
            out.append(
                f"| {r['layers']} | {r['scan']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                f"{_fmt_ms(r)} |"
            )
        out.append("")
    peak = by.get("parts|matmul_peak")
    parts = [r for r in rows if r["section"] == "parts" and "kind" in r]
    if parts:
        out += _header(
            "model", "forward ms", "fwd+bwd ms", "train step ms", "guard select ms",
            "model GFLOP/s", "MFU vs matmul",
        )  # fmt: skip
        for r in parts:
            flops = r["flops_per_token"] * r["tokens"] / r["train_step"]["median_s"]
            mfu = f"{100 * flops / peak['flops_per_s']:.0f} %" if peak else "–"
            out.append(
                f"| {r['kind']} | {_fmt_ms(r['forward'])} | {_fmt_ms(r['value_and_grad'])} | "
                f"{_fmt_ms(r['train_step'])} | {_fmt_ms(r['guard_select'])} | "
                f"{flops / 1e9:.1f} | {mfu} |"
            )
        if peak:
            out.append(f"\n2048³ float32 matmul: {peak['flops_per_s'] / 1e9:.0f} GFLOP/s.")
        out.append("")
    packed = {(r["model"], r["t"], r["packed"]): r for r in rows if r["section"] == "packed"}
    if packed:
        out += _header("model", "T", "documents / row", "step ms", "packed step ms", "ratio")
        for (model, t, is_packed), r in packed.items():
            plain = packed.get((model, t, False))
            if is_packed and plain:
                out.append(
                    f"| {model} | {t} | {r['docs']:.1f} | {_fmt_ms(plain)} | {_fmt_ms(r)} | "
                    f"{r['median_s'] / plain['median_s']:.2f} |"
                )
        out.append("")
    for r in (r for r in rows if r["section"] == "profile"):
        out.append(
            f"Profile of {r['model']} (T {r['t']}, B {r['batch']}; step {_fmt_ms(r['step'])} ms "
            f"untraced): {r['op_s'] / r['steps'] * 1e3:.0f} ms of XLA ops per traced step, "
            f"{r['fast_weight_op_s'] / r['op_s']:.0%} in the fast weight op.\n"
        )
        out += _header("op (JAX op name; `transpose(…)` = backward)", "ms / step", "share")
        for op in r["top"]:
            out.append(
                f"| `{op['name'][:90]}` | {op['s'] / r['steps'] * 1e3:.1f} | "
                f"{op['s'] / r['op_s']:.0%} |"
            )
        out.append("")
    return "\n".join(out)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="length,remat,compile,parts,packed,profile")
    parser.add_argument("--lengths", type=_ints, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (length)")
    parser.add_argument("--length-layers", type=int, default=2)
    parser.add_argument("--remat-t", type=int, default=512)
    parser.add_argument("--remat-batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=24, help="depth of the compile section")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"train_step_{jax.default_backend()}.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.table_only:
        done = {r["key"] for r in rows}
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(row):
            row["backend"] = jax.default_backend()
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

        for name in args.sections.split(","):
            SECTIONS[name](args, done, write)
    print(table(rows))


if __name__ == "__main__":
    main()
