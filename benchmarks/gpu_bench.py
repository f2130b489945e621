"""GPU benchmark of the delta rule: fwjax PALLAS / CHUNKED / RECURRENT and flash-linear-attention.

One driver, one subprocess per stage, so that a crash, a hang or a compile error in one stage
prints its full error and the others still run (JAX and torch never share a process):

1. ``parity``: compiled PALLAS (default, XLA backward, phased schedule) and CHUNKED against
   the float32 REFERENCE at ``B2 T512 H4 D64`` (bf16 and fp32; outputs, final state, all input
   gradients), the sum rule too; then flash-linear-attention's ``chunk_delta_rule`` (bf16) on
   the same inputs, against the same reference (so the timings compare the same computation).
2. ``time``: per (impl, shape, mode) one subprocess: bf16 inputs, every implementation timed by
   the same method (:func:`measure`): warm-up calls until compilation and autotuning are done
   (at least 3, then until 3 consecutive calls agree within 10 %), then ``--repeats`` (≥ 20)
   calls, each synchronised on the device (``block_until_ready`` / ``torch.cuda.synchronize``);
   the median and the 10th–90th percentile spread, tokens/s, achieved GB/s and TFLOP/s. The
   gated delta rule is timed against fla's ``chunk_gated_delta_rule`` the same way, and one
   DeltaNet layer (projections, short convolutions, the op, the output RMSNorm and projection;
   fwd+bwd w.r.t. the input and every weight) against ``fla.layers.DeltaNet``: fwjax's
   ``FastWeightAttention`` with :func:`fwjax.interop.fla.deltanet_config` (PALLAS), bf16.
   With ``--profile`` every timed job also traces three more calls in the same warm process
   and reports the device time of each kernel per call (:mod:`benchmarks.gpu_profile`: JAX's
   profiler for fwjax, ``torch.profiler`` for fla), so that fwjax's phases and fla's kernels
   can be compared one by one at each shape.

Every result is one JSON line, appended to ``<out>/gpu_bench.jsonl`` as it arrives (partial
results survive a timeout) and printed. Usage (repo root, the machine's python3)::

    PYTHONPATH=. python3 benchmarks/gpu_bench.py --out "$OUT"          # the GPU run
    PYTHONPATH=. python3 benchmarks/gpu_bench.py --cpu-smoke --out /tmp/smoke   # CPU dry run

Models (the same for every impl, so the rates compare times): FLOPs of the chunked algorithm
with ``C = 64``, per head-token ``6·K·V + C·(6K + 4V) + C²/3`` forward (WY matmuls) and 3×
that for forward + backward; bytes: inputs read and outputs written once in bf16 (fwd: q, k,
v, β, o; fwd+bwd adds do read and dq, dk, dv, dβ written, plus the forward again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback

C_MODEL = 64
SHAPES = ((8, 1024, 8, 64), (2, 8192, 8, 64), (4, 4096, 16, 128), (1, 32768, 16, 128))
SMOKE_SHAPES = ((1, 64, 2, 16),)
TARGET_SHAPE = (2, 8192, 8, 64)
IMPLS = ("fwjax_pallas", "fla_chunk", "fwjax_chunked", "fwjax_recurrent")
GATED_IMPLS = ("fwjax_gated_pallas", "fla_gated_chunk")  # (B, T, H, D) of SHAPES, after IMPLS
# One layer, fwd+bwd: (B, T, H, D) with d_model = H·D = 1024 / 2048 at T 2048 / 4096.
LAYER_SHAPES = ((2, 2048, 8, 128), (2, 4096, 8, 128), (2, 2048, 16, 128), (2, 4096, 16, 128))
LAYER_IMPLS = ("fwjax_layer", "fla_layer")
SMOKE_LAYER_SHAPES = ((1, 32, 2, 16),)
# Extra PALLAS variants at the target shape, run last, if time is left.
EXTRAS = ("fwjax_pallas_tv32", "fwjax_pallas_tv64", "fwjax_pallas_xla_bwd")
# The split state scan (state_segments P: CHUNKED, and the phased PALLAS chain kernels),
# fwd+bwd at the long shapes with few B·H, against P = 1 (plain CHUNKED here, the phased
# schedule among PHASED's jobs): which P pays, per shape (the rule AUTO needs).
SPLITS = (
    "fwjax_chunked_split4",
    "fwjax_chunked_split16",
    "fwjax_gated_chunked",
    "fwjax_gated_chunked_split16",
    "fwjax_pallas_phased_split4",
    "fwjax_pallas_phased_split16",
    "fwjax_gated_pallas_phased_split16",
)
SMOKE_SPLITS = ("fwjax_chunked_split2", "fwjax_gated_chunked_split2", "fwjax_pallas_phased_split2")
SPLIT_SHAPES = ((2, 8192, 8, 64), (1, 32768, 16, 128))
# PALLAS with PallasSchedule.PHASED (chain kernels + kernels parallel over chunks), both rules,
# with the two-matmul and the one-matmul (PallasChain.AFFINE) chain, every shape and mode,
# against the FUSED default above: which schedule AUTO should pick.
PHASED = (
    "fwjax_pallas_phased",
    "fwjax_gated_pallas_phased",
    "fwjax_pallas_phased_affine",
    "fwjax_gated_pallas_phased_affine",
    # every phased kernel on Mosaic GPU (PallasBackend.MOSAIC_GPU), with either chain
    "fwjax_pallas_phased_mgpu",
    "fwjax_gated_pallas_phased_mgpu",
    "fwjax_pallas_phased_mgpu_affine",
    "fwjax_gated_pallas_phased_mgpu_affine",
)


@dataclasses.dataclass(frozen=True)
class Job:
    impl: str
    b: int
    t: int
    h: int
    d: int
    mode: str  # fwd | fwdbwd
    repeats: int
    smoke: bool
    profile: bool = False  # also the per-kernel device times (benchmarks/gpu_profile.py)

    @property
    def name(self):
        return f"{self.impl}|B{self.b}T{self.t}H{self.h}D{self.d}|{self.mode}"


def model_flops(b, t, h, d, mode):
    fwd = b * t * h * (6 * d * d + C_MODEL * 10 * d + C_MODEL**2 / 3)
    return fwd if mode == "fwd" else 3 * fwd


def model_bytes(b, t, h, d, mode):
    fwd = 2 * b * t * h * (4 * d + 1)  # q, k, v, o (+ β), bf16
    return fwd if mode == "fwd" else 2 * fwd + 2 * b * t * h * (4 * d + 1)


def make_inputs_np(b, t, h, d, seed=0):
    """float32 NumPy inputs: L2-normalised q, k; v, do ~ N(0, 1); β = σ(N(0, 1))."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.standard_normal((b, t, h, d), np.float32))
    k = unit(rng.standard_normal((b, t, h, d), np.float32))
    v = rng.standard_normal((b, t, h, d), np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, h), np.float32)))).astype(np.float32)
    do = rng.standard_normal((b, t, h, d), np.float32)
    return q, k, v, beta, do


def make_log_alpha_np(b, t, h, seed=0):
    """float32 ``log α`` of the gated rule, α ∈ (0.9, 1) (Gated DeltaNet's decays)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return np.log(rng.uniform(0.9, 1.0, (b, t, h))).astype(np.float32)


def measure(call, *, repeats, min_warmup=3, max_warmup=50, settle=0.1, warmup_budget_s=60.0):
    """The one timing method of every implementation.

    ``call()`` runs the computation once and returns after the device has finished it. Warm-up:
    the first call (compilation, autotuning) is reported as ``compile_s``; then calls until the
    last ``min_warmup`` agree within ``settle`` (relative), at most ``max_warmup`` calls or
    ``warmup_budget_s`` seconds; then ``repeats`` timed calls.

    Returns:
      ``dict(compile_s, warmup_calls, times_s, median_s, p10_s, p90_s)``.
    """
    import statistics as st

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    recent: list[float] = []
    start, calls = time.perf_counter(), 0
    while calls < max_warmup:
        t0 = time.perf_counter()
        call()
        calls += 1
        recent = [*recent, time.perf_counter() - t0][-min_warmup:]
        settled = len(recent) == min_warmup and max(recent) <= (1 + settle) * min(recent)
        if settled or time.perf_counter() - start > warmup_budget_s:
            break
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    deciles = st.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {
        "compile_s": compile_s,
        "warmup_calls": calls,
        "times_s": times,
        "median_s": st.median(times),
        "p10_s": deciles[0],
        "p90_s": deciles[-1],
    }


def timed(job: Job, call, framework: str) -> dict:
    """:func:`measure` of ``call``; with ``job.profile`` also the per-kernel device times of
    three more calls (:mod:`benchmarks.gpu_profile`), in the same warm process (a profile
    that fails is recorded as ``kernels_error``; the timing stands)."""
    res = measure(call, repeats=job.repeats)
    if job.profile:
        from benchmarks import gpu_profile

        kernel_times = {
            "jax": gpu_profile.jax_kernel_times,
            "torch": gpu_profile.torch_kernel_times,
        }
        try:
            res["kernels"] = kernel_times[framework](call)
        except Exception as e:  # the timing is the result, the profile an extra
            res["kernels_error"] = f"{type(e).__name__}: {e}"
    return res


# ----------------------------------------------------------------------------- JAX workers


def _jax_op(impl: str, smoke: bool):
    """``op(q, k, v, beta, log_alpha) -> (out, state)`` of the fwjax implementation ``impl``."""
    import jax.numpy as jnp

    from fwjax.ops import Impl, delta_rule, gated_delta_rule
    from fwjax.ops.pallas import (
        PallasBackend,
        PallasBackward,
        PallasChain,
        PallasOptions,
        PallasSchedule,
    )

    chunk = 16 if smoke else 64
    segments = int(impl.rsplit("_split", 1)[1]) if "_split" in impl else None
    if impl.startswith("fwjax_gated"):
        kind = Impl.PALLAS if impl.startswith("fwjax_gated_pallas") else Impl.CHUNKED
        phased = None
        if "_phased" in impl:
            chain = PallasChain.AFFINE if impl.endswith("_affine") else PallasChain.UPDATE
            backend = PallasBackend.MOSAIC_GPU if "_mgpu" in impl else PallasBackend.TRITON
            phased = PallasOptions(schedule=PallasSchedule.PHASED, chain=chain, backend=backend)

        def gated(q, k, v, beta, log_alpha):
            alpha = jnp.exp(log_alpha)
            scale = q.shape[-1] ** -0.5
            return gated_delta_rule(
                q,
                k,
                v,
                beta,
                alpha,
                None,
                scale,
                impl=kind,
                chunk_size=chunk,
                state_segments=segments,
                pallas=phased,
            )

        return gated
    pallas = None
    if impl.startswith("fwjax_chunked_split"):
        kind = Impl.CHUNKED
    elif impl.startswith("fwjax_pallas"):
        kind = Impl.PALLAS
        if impl.endswith("_xla_bwd"):
            pallas = PallasOptions(backward=PallasBackward.XLA)
        elif "_phased" in impl:
            chain = PallasChain.AFFINE if impl.endswith("_affine") else PallasChain.UPDATE
            backend = PallasBackend.MOSAIC_GPU if "_mgpu" in impl else PallasBackend.TRITON
            pallas = PallasOptions(schedule=PallasSchedule.PHASED, chain=chain, backend=backend)
        elif "_tv" in impl:
            pallas = PallasOptions(value_block=int(impl.rsplit("_tv", 1)[1]))
    else:
        kind = {"fwjax_chunked": Impl.CHUNKED, "fwjax_recurrent": Impl.RECURRENT}[impl]

    def op(q, k, v, beta, log_alpha):
        del log_alpha  # the delta rule has no decay
        scale = q.shape[-1] ** -0.5
        return delta_rule(
            q,
            k,
            v,
            beta,
            None,
            scale,
            impl=kind,
            chunk_size=chunk,
            pallas=pallas,
            state_segments=segments,
        )

    return op


def worker_time_jax_layer(job: Job):
    """fwjax's DeltaNet layer (fla's defaults: short convolutions, SiLU + L2 q/k, β, output
    RMSNorm, no gate), bf16 compute and parameters, fwd+bwd w.r.t. the input and every weight."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fwjax.interop.fla import DeltaNetShape, deltanet_config
    from fwjax.nn import FastWeightAttention
    from fwjax.ops import Impl

    d_model = job.h * job.d
    shape = DeltaNetShape(hidden_size=d_model, num_heads=job.h, conv_size=4, use_gate=False)
    config = deltanet_config(shape, impl=Impl.PALLAS)
    layer = FastWeightAttention(
        config, d_model, job.h, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    graph, params = nnx.split(layer)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((job.b, job.t, d_model)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((job.b, job.t, d_model)), jnp.bfloat16)

    def forward(params, x):
        y, _ = nnx.merge(graph, params)(x)
        return y

    if job.mode == "fwd":
        fn = jax.jit(forward)
    else:
        fn = jax.jit(lambda p, x: jax.vjp(forward, p, x)[1](dy))
    res = timed(job, lambda: jax.block_until_ready(fn(params, x)), "jax")
    return {**res, "device": str(jax.devices()[0])}


def worker_time_jax(job: Job):
    import jax
    import jax.numpy as jnp

    if job.impl == "fwjax_layer":
        return worker_time_jax_layer(job)
    op = _jax_op(job.impl, job.smoke)
    q, k, v, beta, do = (
        jnp.asarray(x, jnp.bfloat16) for x in make_inputs_np(job.b, job.t, job.h, job.d)
    )
    log_alpha = jnp.asarray(make_log_alpha_np(job.b, job.t, job.h))  # float32
    if job.mode == "fwd":
        fn = jax.jit(lambda q, k, v, beta, log_alpha: op(q, k, v, beta, log_alpha)[0])
        args = (q, k, v, beta, log_alpha)
    else:

        def fwdbwd(q, k, v, beta, log_alpha, do):
            out, pullback = jax.vjp(lambda *a: op(*a)[0], q, k, v, beta, log_alpha)
            return out, pullback(do)

        fn = jax.jit(fwdbwd)
        args = (q, k, v, beta, log_alpha, do)
    res = timed(job, lambda: jax.block_until_ready(fn(*args)), "jax")
    return {**res, "device": str(jax.devices()[0])}


def _errors(got, ref):
    """max|got − ref| / max(1, max|ref|) per named array."""
    import numpy as np

    out = {}
    for name, g in got.items():
        r = np.asarray(ref[name], np.float64)
        err = np.max(np.abs(np.asarray(g, np.float64) - r)) / max(1.0, float(np.max(np.abs(r))))
        out[name] = float(err)
    return out


def worker_parity_jax(smoke: bool, out_dir: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fwjax.ops import Impl, delta_rule, sum_rule
    from fwjax.ops.pallas import PallasBackend, PallasBackward, PallasOptions, PallasSchedule

    b, t, h, d = (1, 40, 2, 16) if smoke else (2, 512, 4, 64)
    chunk = 16 if smoke else 64
    q, k, v, beta, do = make_inputs_np(b, t, h, d, seed=1)
    rng = np.random.default_rng(2)
    ds = rng.standard_normal((b, h, d, d)).astype(np.float32)
    s0 = (0.5 * rng.standard_normal((b, h, d, d))).astype(np.float32)
    scale = d**-0.5
    results = []

    def run(rule, impl, dtype, pallas=None):
        cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
        names = ("q", "k", "v", "beta", "s0") if rule == "delta" else ("q", "k", "v", "s0")
        prim = {"q": cast(q), "k": cast(k), "v": cast(v), "beta": cast(beta)}
        prim["s0"] = jnp.asarray(s0)

        def f(*a):
            x = dict(zip(names, a, strict=True))
            if rule == "delta":
                return delta_rule(
                    x["q"], x["k"], x["v"], x["beta"], x["s0"], scale,
                    impl=impl, chunk_size=chunk, pallas=pallas,
                )  # fmt: skip
            return sum_rule(
                x["q"], x["k"], x["v"], x["s0"], scale, impl=impl, chunk_size=chunk, pallas=pallas
            )

        @jax.jit
        def go(*a):
            (o, s), pullback = jax.vjp(f, *a)
            return o, s, pullback((cast(do), jnp.asarray(ds)))

        o, s, grads = go(*(prim[n] for n in names))
        named = {"o": o, "state": s, **{f"d{n}": g for n, g in zip(names, grads, strict=True)}}
        return {n: np.asarray(jnp.asarray(x, jnp.float32)) for n, x in named.items()}

    for rule in ("delta", "sum"):
        with jax.default_matmul_precision("highest"):
            ref = run(rule, Impl.REFERENCE, jnp.float32)
        if rule == "delta":
            np.savez(
                os.path.join(out_dir, "parity_ref.npz"),
                q=q, k=k, v=v, beta=beta, do=do, ds=ds, s0=s0, scale=scale, **ref,
            )  # fmt: skip
        variants = [("chunked", Impl.CHUNKED, None), ("pallas", Impl.PALLAS, None)]
        variants.append(("pallas_xla_bwd", Impl.PALLAS, PallasOptions(backward=PallasBackward.XLA)))
        triton = PallasOptions(schedule=PallasSchedule.PHASED, backend=PallasBackend.TRITON)
        variants.append(("pallas_phased", Impl.PALLAS, triton))
        if rule == "delta":  # Mosaic GPU's kernels: bfloat16 only
            mgpu = PallasOptions(schedule=PallasSchedule.PHASED, backend=PallasBackend.MOSAIC_GPU)
            variants.append(("pallas_phased_mgpu", Impl.PALLAS, mgpu))
        for label, impl, pallas in variants:
            for dtype in (jnp.float32, jnp.bfloat16):
                if label.endswith("_mgpu") and dtype == jnp.float32:
                    continue
                rec = {
                    "stage": "parity",
                    "rule": rule,
                    "impl": label,
                    "dtype": jnp.dtype(dtype).name,
                }
                try:
                    rec["rel_err"] = _errors(run(rule, impl, dtype, pallas), ref)
                    rec["max_rel_err"] = max(rec["rel_err"].values())
                    # bf16 inputs: 2^-8 per rounding; fp32: TF32-level XLA matmuls on GPU.
                    rec["ok"] = rec["max_rel_err"] < (5e-2 if dtype == jnp.bfloat16 else 5e-3)
                except Exception:  # report it and go on with the other variants
                    rec["ok"] = False
                    rec["error"] = traceback.format_exc()
                results.append(rec)
                print(json.dumps(rec), flush=True)
    return results


# --------------------------------------------------------------------------- torch workers


def _fla():
    import torch
    from fla.ops.delta_rule import chunk_delta_rule

    return torch, chunk_delta_rule


def worker_time_fla_layer(job: Job):
    """``fla.layers.DeltaNet`` (its defaults: ``mode="chunk"``, short convolutions, SiLU + L2
    q/k, β, output RMSNorm, no gate) in bf16, fwd+bwd w.r.t. the input and every weight."""
    import numpy as np
    import torch
    from fla.layers import DeltaNet

    d_model = job.h * job.d
    layer = DeltaNet(hidden_size=d_model, num_heads=job.h).to("cuda", torch.bfloat16)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((job.b, job.t, d_model), np.float32))
    x = x.to("cuda", torch.bfloat16).requires_grad_(job.mode == "fwdbwd")
    dy = torch.from_numpy(rng.standard_normal((job.b, job.t, d_model), np.float32))
    dy = dy.to("cuda", torch.bfloat16)
    weights = [x, *layer.parameters()]

    def call():
        y = layer(x)[0]
        if job.mode == "fwdbwd":
            torch.autograd.grad(y, weights, dy)
        torch.cuda.synchronize()

    res = timed(job, call, "torch")
    return {**res, "device": torch.cuda.get_device_name()}


def worker_time_fla(job: Job):
    """fla's ``chunk_delta_rule`` (``fla_chunk``) or ``chunk_gated_delta_rule`` with
    ``g = log α`` (``fla_gated_chunk``), timed by :func:`measure`."""
    if job.impl == "fla_layer":
        return worker_time_fla_layer(job)
    torch, chunk_delta_rule = _fla()
    dev = "cuda"
    q, k, v, beta, do = (
        torch.from_numpy(x).to(dev, torch.bfloat16)
        for x in make_inputs_np(job.b, job.t, job.h, job.d)
    )
    scale = job.d**-0.5
    grad_of = [q, k, v, beta]
    if job.impl == "fla_gated_chunk":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        g = torch.from_numpy(make_log_alpha_np(job.b, job.t, job.h)).to(dev, torch.float32)
        grad_of.append(g)
        op = lambda: chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)
    else:
        op = lambda: chunk_delta_rule(q, k, v, beta, scale=scale)
    for x in grad_of:
        x.requires_grad_(job.mode == "fwdbwd")

    def call():
        o, _ = op()
        if job.mode == "fwdbwd":
            torch.autograd.grad(o, grad_of, do)
        torch.cuda.synchronize()

    res = timed(job, call, "torch")
    return {**res, "device": torch.cuda.get_device_name()}


def worker_parity_fla(out_dir: str):
    import numpy as np

    torch, chunk_delta_rule = _fla()
    ref = np.load(os.path.join(out_dir, "parity_ref.npz"))
    t = {n: torch.from_numpy(ref[n]).cuda() for n in ("q", "k", "v", "beta", "do", "ds", "s0")}
    bf = {n: t[n].to(torch.bfloat16).requires_grad_(True) for n in ("q", "k", "v", "beta")}
    s0 = t["s0"].clone().requires_grad_(True)
    o, s = chunk_delta_rule(
        bf["q"], bf["k"], bf["v"], bf["beta"], scale=float(ref["scale"]),
        initial_state=s0, output_final_state=True,
    )  # fmt: skip
    grads = torch.autograd.grad(
        (o, s), (bf["q"], bf["k"], bf["v"], bf["beta"], s0), (t["do"].to(o.dtype), t["ds"])
    )
    names = ("q", "k", "v", "beta", "s0")
    got = {"o": o, "state": s, **{f"d{n}": g for n, g in zip(names, grads, strict=True)}}
    got = {n: x.detach().float().cpu().numpy() for n, x in got.items()}
    rec = {"stage": "parity", "rule": "delta", "impl": "fla_chunk", "dtype": "bfloat16"}
    rec["rel_err"] = _errors(got, ref)
    rec["max_rel_err"] = max(rec["rel_err"].values())
    rec["ok"] = rec["max_rel_err"] < 5e-2
    print(json.dumps(rec), flush=True)


def worker_main(argv):
    kind, payload = argv[0], argv[1]
    if kind == "parity_jax":
        args = json.loads(payload)
        worker_parity_jax(args["smoke"], args["out"])
        return
    if kind == "parity_fla":
        worker_parity_fla(json.loads(payload)["out"])
        return
    job = Job(**json.loads(payload))
    res = worker_time_fla(job) if job.impl.startswith("fla_") else worker_time_jax(job)
    print("RESULT " + json.dumps(time_record(job, res)), flush=True)


def time_record(job: Job, res: dict) -> dict:
    """The JSONL record of a timed job: the job, :func:`timed`'s result and the rates."""
    med = res["median_s"]
    rec = {"stage": "time", **dataclasses.asdict(job), **res}
    rec["tokens_per_s"] = job.b * job.t / med
    rec["gb_per_s"] = model_bytes(job.b, job.t, job.h, job.d, job.mode) / med / 1e9
    rec["tflop_per_s"] = model_flops(job.b, job.t, job.h, job.d, job.mode) / med / 1e12
    return rec


def format_result(name: str, rec: dict) -> str:
    """One timing record as text: median, spread, rates, and its kernels if profiled."""
    ms, mtok = rec["median_s"] * 1e3, rec["tokens_per_s"] / 1e6
    spread = f"{rec['p10_s'] * 1e3:.2f}–{rec['p90_s'] * 1e3:.2f}"
    text = (
        f"   {name}: {ms:.2f} ms ({spread})  {mtok:.2f} Mtok/s"
        f"  {rec['gb_per_s']:.1f} GB/s  {rec['tflop_per_s']:.2f} TFLOP/s"
        f"  (compile {rec['compile_s']:.1f}s, {rec['warmup_calls']} warm-up calls)"
    )
    if "kernels" in rec:
        from benchmarks.gpu_profile import format_profile

        text += "\n" + format_profile(rec["kernels"])
    if "kernels_error" in rec:
        text += f"\n     profile failed: {rec['kernels_error']}"
    return text


# ---------------------------------------------------------------------------------- driver


class Driver:
    def __init__(self, out_dir, deadline_s, timeout_s):
        self.out_dir = out_dir
        self.jsonl = os.path.join(out_dir, "gpu_bench.jsonl")
        self.deadline = time.monotonic() + deadline_s
        self.timeout_s = timeout_s

    def record(self, rec):
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def spawn(self, kind, payload, label, env_extra=None):
        """Runs one worker; prints its full output; returns its stdout lines (or [])."""
        left = self.deadline - time.monotonic()
        if left < 15:
            self.record({"stage": "skipped", "label": label, "reason": "out of time"})
            print(f"== {label}: SKIPPED (out of time)", flush=True)
            return []
        env = {**os.environ, **(env_extra or {})}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, payload]
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=min(self.timeout_s, left)
            )
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        wall = time.monotonic() - t0
        print(f"== {label}: rc={rc} wall={wall:.1f}s", flush=True)
        if rc != 0:
            print(out[-4000:] + "\n" + err[-8000:], flush=True)
            self.record({"stage": "error", "label": label, "rc": str(rc), "stderr": err[-8000:]})
        return out.splitlines()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpret)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=400.0, help="seconds for the whole run")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per subprocess")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="also per-kernel device times of every timed job"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: time only jobs whose name has one, in their order",
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)

    os.makedirs(args.out, exist_ok=True)
    drv = Driver(args.out, args.deadline, args.timeout)
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    smoke = args.cpu_smoke
    t_start = time.monotonic()

    # 1. parity (compiled on GPU), then FLA on the same inputs.
    if not args.skip_parity:
        payload = json.dumps({"smoke": smoke, "out": args.out})
        for line in drv.spawn("parity_jax", payload, "parity fwjax", env):
            if line.startswith("{"):
                drv.record(json.loads(line))
                print(line, flush=True)
        if not smoke:
            for line in drv.spawn("parity_fla", payload, "parity fla", env):
                if line.startswith("{"):
                    drv.record(json.loads(line))
                    print(line, flush=True)

    # 2. timings: the target shape first, the essential impls first, extras last.
    others = tuple(s for s in SHAPES if s != TARGET_SHAPE)
    shapes = SMOKE_SHAPES if smoke else (TARGET_SHAPE, *others)
    impls = tuple(i for i in IMPLS + GATED_IMPLS if not (smoke and i.startswith("fla_")))
    jobs = [
        Job(impl, *shape, mode, 3 if smoke else args.repeats, smoke, args.profile)
        for shape in shapes
        for mode in ("fwdbwd", "fwd")
        for impl in impls
    ]
    jobs += [
        Job(impl, *shape, mode, 3 if smoke else args.repeats, smoke, args.profile)
        for shape in shapes
        for mode in ("fwdbwd", "fwd")
        for impl in PHASED
    ]
    layer_impls = tuple(i for i in LAYER_IMPLS if not (smoke and i.startswith("fla_")))
    jobs += [
        Job(impl, *shape, "fwdbwd", 3 if smoke else args.repeats, smoke, args.profile)
        for shape in (SMOKE_LAYER_SHAPES if smoke else LAYER_SHAPES)
        for impl in layer_impls
    ]
    extras_shape = SMOKE_SHAPES[0] if smoke else TARGET_SHAPE
    jobs += [
        Job(impl, *extras_shape, "fwdbwd", 3 if smoke else args.repeats, smoke, args.profile)
        for impl in (EXTRAS[-1:] if smoke else EXTRAS)
    ]
    jobs += [
        Job(impl, *shape, "fwdbwd", 3 if smoke else args.repeats, smoke, args.profile)
        for shape in (SMOKE_SHAPES if smoke else SPLIT_SHAPES)
        for impl in (SMOKE_SPLITS if smoke else SPLITS)
    ]
    if args.only:
        # The jobs whose name holds one of the substrings, in the order of the first each holds.
        wanted = [w for w in args.only.split(",") if w]
        jobs = [j for j in jobs if any(w in j.name for w in wanted)]
        jobs.sort(key=lambda j: next(i for i, w in enumerate(wanted) if w in j.name))
    for job in jobs:
        for line in drv.spawn("time", json.dumps(dataclasses.asdict(job)), job.name, env):
            if line.startswith("RESULT "):
                rec = json.loads(line[len("RESULT ") :])
                drv.record(rec)
                print(format_result(job.name, rec), flush=True)
    print(f"done in {time.monotonic() - t_start:.0f}s; results in {drv.jsonl}", flush=True)
    summarize(drv.jsonl)


def summarize(path):
    """Prints the fwd+bwd ratios the GPU targets compare (fwjax vs fla), from the JSONL results."""
    with open(path) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    times = {
        (r["impl"], r["b"], r["t"], r["h"], r["d"], r["mode"]): r["median_s"]
        for r in rows
        if r.get("stage") == "time"
    }
    for b, t, h, d in SHAPES + SMOKE_SHAPES + LAYER_SHAPES + SMOKE_LAYER_SHAPES:
        for mode in ("fwdbwd", "fwd"):
            p = times.get(("fwjax_pallas", b, t, h, d, mode))
            if p is None:
                continue
            for other in ("fla_chunk", "fwjax_chunked", "fwjax_recurrent"):
                o = times.get((other, b, t, h, d, mode))
                if o is not None:
                    print(f"B{b}T{t}H{h}D{d} {mode}: PALLAS throughput = {o / p:.2f} x {other}")
            layer = times.get(("fwjax_layer", b, t, h, d, mode))
            fla_layer = times.get(("fla_layer", b, t, h, d, mode))
            if layer is not None and fla_layer is not None:
                ratio = fla_layer / layer
                print(f"B{b}T{t}H{h}D{d} {mode}: DeltaNet layer throughput = {ratio:.2f} x fla")
            gated = times.get(("fwjax_gated_pallas", b, t, h, d, mode))
            fla_gated = times.get(("fla_gated_chunk", b, t, h, d, mode))
            if gated is not None and fla_gated is not None:
                ratio = fla_gated / gated
                print(f"B{b}T{t}H{h}D{d} {mode}: gated PALLAS throughput = {ratio:.2f} x fla")


if __name__ == "__main__":
    main()
