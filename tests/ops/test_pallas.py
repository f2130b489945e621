"""Impl.PALLAS beyond the shared parity suite (which runs it with default options).

On CPU every kernel runs in interpret mode: the TPU kernel family, the XLA-backward option,
value tiling (partial sums over tiles), the float32 precision option and float16 inputs.
``-m gpu`` / ``-m tpu`` run the kernels compiled where that hardware is the default backend
(e.g. ``JAX_PLATFORMS=cuda pytest -m gpu tests/ops/test_pallas.py``).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from fwjax.ops.pallas import (
    PallasBackend,
    PallasBackward,
    PallasChain,
    PallasOptions,
    PallasPrecision,
    PallasSchedule,
    kernel_config,
    resolve_backend,
    resolve_interpret,
    triton_tiling,
)
from tests.ops.rules import CASES, DELTA, GATED, RULES, Case, make_inputs
from tests.tolerances import assert_close

RULE_IDS = {"ids": lambda r: r.name}
# The option tests run the delta rule by default; the sum rule's are slow (same kernel family).
OPTION_RULES = [r if r is DELTA else pytest.param(r, marks=pytest.mark.slow) for r in RULES]
# The compiled tests also run the gated rule's kernel (its backward is XLA's for either option).
KERNEL_RULES = (*RULES, GATED)
# Two chunks of 16, T not divisible by the chunk, odd K and V (padded for Triton), B, H > 1.
SMALL = CASES[1]


def _grads(rule, inputs, impl, chunk, options=None, seed=1):
    """VJP with random cotangents on both outputs; returns (out, state, grads dict)."""
    names = rule.diff_args

    def f(*args):
        return rule(inputs, impl, chunk, pallas=options, **dict(zip(names, args, strict=True)))

    (out, state), pullback = jax.vjp(f, *(inputs[n] for n in names))
    rng = np.random.default_rng(seed)
    d_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32).astype(out.dtype)
    d_state = jnp.asarray(rng.normal(size=state.shape), state.dtype)
    grads = pullback((d_out, d_state))
    return out, state, dict(zip(names, grads, strict=True))


@functools.cache
def _chunked(rule, case, dtype):
    """CHUNKED outputs and gradients, computed once per (rule, case, dtype) (compiles are slow)."""
    return jax.jit(lambda x: _grads(rule, x, Impl.CHUNKED, case.chunk))(make_inputs(case, dtype))


def _compare(rule, case, dtype, options, tol_dtype=None, reference=None):
    """PALLAS with ``options`` against CHUNKED (of ``reference``, default ``rule``): outputs,
    final state and every gradient."""
    inputs = make_inputs(case, dtype)
    got = jax.jit(lambda x: _grads(rule, x, Impl.PALLAS, case.chunk, options))(inputs)
    want = _chunked(reference or rule, case, dtype)
    assert_close(got[0], want[0], tol_dtype, err_msg="output")
    assert_close(got[1], want[1], tol_dtype, err_msg="final state")
    for name in rule.diff_args:
        assert got[2][name].dtype == want[2][name].dtype, name
        assert_close(got[2][name], want[2][name], tol_dtype, err_msg=f"d{name}")


@pytest.mark.parametrize("rule", OPTION_RULES, **RULE_IDS)
def test_tpu_kernels_in_interpret_mode(rule):
    _compare(rule, SMALL, jnp.float32, PallasOptions(backend=PallasBackend.MOSAIC_TPU))


@pytest.mark.parametrize("rule", [*RULES, GATED], **RULE_IDS)
def test_xla_backward_option(rule):
    _compare(rule, SMALL, jnp.float32, PallasOptions(backward=PallasBackward.XLA))


@pytest.mark.parametrize("rule", [*OPTION_RULES, GATED], **RULE_IDS)
def test_value_tiles_sum_their_partial_gradients(rule):
    """V = 40 pads to 64 = 4 tiles of 16: dq, dk (and dW, dP, the gated rule's chunk-decay
    cotangent) are summed over tiles."""
    case = Case(b=1, t=24, h=2, k=8, v=40, chunk=16)
    _compare(rule, case, jnp.float32, PallasOptions(value_block=16))


PHASED = PallasSchedule.PHASED
AFFINE = PallasChain.AFFINE
TPU = PallasBackend.MOSAIC_TPU


@pytest.mark.parametrize(
    ("rule", "options", "segments"),
    [
        (DELTA, PallasOptions(schedule=PHASED, value_block=16), 3),
        (GATED, PallasOptions(schedule=PHASED, value_block=16), None),
        (DELTA, PallasOptions(schedule=PHASED, backend=TPU), None),
        (GATED, PallasOptions(schedule=PHASED, backward=PallasBackward.XLA), None),
        (DELTA, PallasOptions(schedule=PHASED, chain=AFFINE, value_block=16), None),
        (GATED, PallasOptions(schedule=PHASED, chain=AFFINE, backend=TPU), 2),
    ],
    ids=[
        "delta-value_tiles-split",
        "gated-value_tiles",
        "delta-tpu_kernels",
        "gated-xla_backward",
        "delta-affine_chain-value_tiles",
        "gated-affine_chain-tpu_kernels-split",
    ],
)
def test_phased_schedule_options(rule, options, segments):
    """The phased kernels with several value tiles in the chain kernels (V = 40 pads to 64 = 4
    tiles of 16; the parallel kernels take the whole V), on the TPU kernel family, with the XLA
    backward fed the states the chain kernel saved (in the matmul dtype), with the affine
    chain ``S ← M S + B`` (``PallasChain.AFFINE``), and with the split state scan
    (``state_segments``: 3 chunks in 3 segments with the widened carry ``[E | Φ]`` in value
    tiles; 3 chunks in 2 segments, padded to 4, on the TPU kernels (one whole block); the
    parity suite's gated phased rule splits too)."""
    case = SMALL
    if options.value_block:
        case = Case(b=1, t=40 if segments else 24, h=2, k=8, v=40, chunk=16)
    split = dataclasses.replace(rule, state_segments=segments)
    _compare(split, case, jnp.float32, options, reference=rule)


def test_split_state_scan_sizes():
    """``P`` of the phased kernels' split state scan, and ``N`` padded to a multiple of it."""
    config = functools.partial(kernel_config, out_dtype=jnp.float32, state_dtype=jnp.float32)
    phased = PallasOptions(schedule=PHASED)
    shape = (8192, 64, 64, 64, 2)  # T, K, V, chunk, B·H: 128 chunks
    assert config(phased, *shape, state_segments=3).tiling[4:] == (129, 3)  # 3 × 43
    assert config(phased, *shape, state_segments=8).tiling[4:] == (128, 8)
    assert config(phased, *shape).tiling[4:] == (128, 1)
    assert config(PallasOptions(), *shape, state_segments=8).tiling[4:] == (128, 1)  # FUSED
    # B·H 16: the chain's 16·4 programs need value tiles of 16; split in 8 they need none.
    assert config(phased, 8192, 64, 64, 64, 16).tiling.value_block == 16
    assert config(phased, 8192, 64, 64, 64, 16, state_segments=8).tiling.value_block == 64
    # 9 chunks asked for 8 segments: 5 segments of 2 (one no-op chunk), not 16 chunks.
    assert config(phased, 9 * 16, 64, 64, 16, 2, state_segments=8).tiling[4:] == (10, 5)


# The custom-call targets of Pallas kernels per platform (no export compatibility guarantee).
TARGETS = {"cuda": ("__gpu$xla.gpu.triton",), "tpu": ("tpu_custom_call",)}


def _lowered_text(f, args, platform) -> str:
    """The StableHLO of ``f``'s forward and VJP lowered for ``platform`` (no device needed)."""

    def forward_and_vjp(*args):
        (out, state), pullback = jax.vjp(f, *args)
        return out, state, pullback((out, state))

    unchecked = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS[platform]]
    export = jax.export.export(
        jax.jit(forward_and_vjp), platforms=[platform], disabled_checks=unchecked
    )
    return export(*args).mlir_module()


def _custom_calls(text) -> list[str]:
    """The custom calls of lowered StableHLO, one line each (target, then the kernel's
    module, which holds the kernel's name)."""
    return [line for line in text.splitlines() if "stablehlo.custom_call @" in line]


def _assert_lowered_through(calls, kernel, target):
    """``kernel`` (its full name) lowers to at least one custom call, all to ``target``."""
    named = [call for call in calls if re.search(rf'{kernel}(\\00|")', call)]
    assert named and all(f"@{target}(" in call for call in named), kernel


@pytest.mark.parametrize(
    ("platform", "backend"), [("cuda", PallasBackend.TRITON), ("tpu", PallasBackend.MOSAIC_TPU)]
)
def test_kernels_lower_for_gpu_and_tpu_on_this_machine(monkeypatch, platform, backend):
    """Every kernel of both schedules (and both chains), forward and backward, through Pallas'
    Triton and Mosaic TPU lowerings (``jax.export`` for that platform: lowering only, no
    compiler or device), so an op a backend cannot lower fails here, not on a GPU or TPU."""
    import fwjax.ops.pallas as pallas_module
    from fwjax.ops import delta_rule, gated_delta_rule, sum_rule

    monkeypatch.setattr(pallas_module, "resolve_interpret", lambda options, platform=None: False)
    x = jnp.ones((1, 40, 2, 16), jnp.bfloat16)  # T not divisible by the chunk; padded tiles
    gate = jnp.full((1, 40, 2), 0.9, jnp.bfloat16)
    kw = {"impl": Impl.PALLAS, "chunk_size": 16}
    ops = {
        "delta_rule": lambda p, n, *a: delta_rule(
            *a, gate, None, 0.25, pallas=p, state_segments=n, **kw
        ),
        "gated_delta_rule": lambda p, n, *a: gated_delta_rule(
            *a, gate, gate, None, 0.25, pallas=p, state_segments=n, **kw
        ),
        "sum_rule": lambda p, n, *a: sum_rule(*a, None, 0.25, pallas=p, **kw),
    }
    # The phased chains split in 2 segments: the widened chain kernels, and the plain ones
    # (each segment rerun from its true start).
    variants = [(PallasSchedule.FUSED, PallasChain.UPDATE, 1), (PHASED, PallasChain.UPDATE, 2)]
    variants.append((PHASED, AFFINE, 2))
    for name, op in ops.items():
        # The sum rule has only the FUSED kernels (PHASED runs them too).
        for schedule, chain, segments in variants[:1] if name == "sum_rule" else variants:
            options = PallasOptions(backend=backend, schedule=schedule, chain=chain)
            text = _lowered_text(functools.partial(op, options, segments), (x, x, x), platform)
            suffixes = ("fwd", "bwd")
            if schedule is PHASED:
                suffixes = ("wy", "chain_fwd", "out", "chain_bwd", "grads", "wy_bwd")
                suffixes += ("affine", "affine_bwd") if chain is AFFINE else ()
                suffixes += ("chain_fwd_maps", "chain_bwd_maps") if segments > 1 else ()
            for suffix in suffixes:
                assert f"{name}_{suffix}" in text, (platform, options, segments, name, suffix)


def test_state_precision_keeps_bfloat16_states_float32_accurate():
    """PallasPrecision.STATE: bfloat16 inputs, float32 matmuls; the state meets float32."""
    rule = DELTA
    inputs = make_inputs(SMALL, jnp.bfloat16)
    options = PallasOptions(precision=PallasPrecision.STATE)
    out, state = rule(inputs, Impl.PALLAS, SMALL.chunk, pallas=options)
    expected_out, expected_state = DELTA.oracle(inputs)
    assert_close(out, expected_out)
    assert_close(state, expected_state)  # float32 tolerance


def test_float16_inputs():
    inputs = make_inputs(SMALL, jnp.float16)
    out, state = DELTA(inputs, Impl.PALLAS, SMALL.chunk)
    expected_out, expected_state = DELTA.oracle(inputs)
    assert out.dtype == jnp.float16 and state.dtype == jnp.float32
    # float16 has a 10-bit mantissa: the bfloat16 tolerance bounds it.
    assert_close(out, expected_out, jnp.bfloat16)
    assert_close(state, expected_state, jnp.bfloat16)


def test_backend_interpret_and_tiling_resolution():
    assert resolve_interpret(PallasOptions(interpret=False), "cpu")  # no CPU compiler
    assert not resolve_interpret(PallasOptions(), "gpu")
    assert resolve_interpret(PallasOptions(interpret=True), "gpu")
    assert resolve_backend(PallasOptions(), "tpu") is PallasBackend.MOSAIC_TPU
    assert resolve_backend(PallasOptions(), "gpu") is PallasBackend.TRITON
    # B·H = 16 programs at D = 64: tiles halve to 16 wide (64 programs); chunk and dims >= 16.
    tiling = triton_tiling(8192, 64, 64, 64, 16, PallasOptions())
    assert (tiling.chunk, tiling.key, tiling.value_block, tiling.chunks) == (64, 64, 16, 128)
    assert triton_tiling(5, 3, 20, 64, 1, PallasOptions())[:3] == (16, 16, 32)


GPU_CASES = (
    Case(b=2, t=300, h=2, k=64, v=64, chunk=64),
    Case(b=1, t=256, h=2, k=128, v=128, chunk=64),
)


def _compiled(rule, case, dtype, backward, schedule=PallasSchedule.FUSED):
    if schedule is PHASED and rule not in (DELTA, GATED):
        pytest.skip("the sum rule has no phased kernels (it runs FUSED)")
    options = PallasOptions(backward=backward, schedule=schedule)
    # Compiled kernels: bfloat16 matmul operands with INPUT precision; float32 uses IEEE fp32.
    _compare(rule, case, dtype, options, tol_dtype=jnp.bfloat16 if dtype == jnp.bfloat16 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", list(PallasSchedule), ids=lambda s: s.value)
@pytest.mark.parametrize("backward", list(PallasBackward), ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("rule", KERNEL_RULES, **RULE_IDS)
def test_compiled_gpu(rule, case, dtype, backward, schedule):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU default backend (JAX_PLATFORMS=cuda)")
    _compiled(rule, case, dtype, backward, schedule)


@pytest.mark.tpu
@pytest.mark.parametrize("schedule", list(PallasSchedule), ids=lambda s: s.value)
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("rule", KERNEL_RULES, **RULE_IDS)
def test_compiled_tpu(rule, dtype, schedule):
    if jax.default_backend() != "tpu":
        pytest.skip("needs a TPU default backend")
    _compiled(rule, GPU_CASES[1], dtype, PallasBackward.KERNEL, schedule)


@pytest.mark.parametrize(
    ("packed", "schedule"),
    [(False, PallasSchedule.FUSED), (True, PallasSchedule.FUSED), (False, PHASED)],
    ids=["plain", "packed", "phased"],
)
def test_gated_chunk_decay_keeps_float32_with_bfloat16_inputs(packed, schedule):
    """α = 0.9999 with bfloat16 inputs: a 16-step chunk decays by 0.9984, which bfloat16 rounds
    to exactly 1.0 (the head would stop forgetting). With no writes (zero keys and values) the
    state after T steps is exactly α^T · S₀ in float32 (bfloat16 decays leave it at S₀)."""
    from fwjax.ops import gated_delta_rule

    b, t, h, d = 1, 128, 1, 16
    zeros = jnp.zeros((b, t, h, d), jnp.bfloat16)
    beta = jnp.full((b, t, h), 0.5, jnp.bfloat16)
    alpha = jnp.full((b, t, h), 0.9999, jnp.float32)
    s0 = jnp.ones((b, h, d, d), jnp.float32)
    ids = jnp.zeros((b, t), jnp.int32) if packed else None
    _, state = gated_delta_rule(
        zeros,
        zeros,
        zeros,
        beta,
        alpha,
        s0,
        1.0,
        impl=Impl.PALLAS,
        chunk_size=16,
        segment_ids=ids,
        pallas=PallasOptions(schedule=schedule),
    )
    np.testing.assert_allclose(state, np.full(s0.shape, 0.9999**t), rtol=1e-4)


def test_gated_chunk_decay_travels_as_one_float32_value_per_chunk():
    """The kernels read ``Γ_C`` as ``[B, H, N, 1, 1]`` in the state dtype (``CHUNK_SCALAR``),
    not a ``[C, K]`` tile per chunk, whatever the matmul dtype."""
    from fwjax.ops.gated_delta_rule.pallas import KERNEL

    b, h, n, c, d = 2, 3, 4, 16, 8
    x = jnp.ones((b, h, n, c, d), jnp.float32) / d
    gate = jnp.full((b, h, n, c), 0.5, jnp.float32)
    terms = KERNEL.phase1(x, x, x, gate, jnp.log(gate))
    decay = KERNEL.cast_operands(terms, jnp.bfloat16, jnp.float32)[-1]
    assert decay.shape == (b, h, n, 1, 1) and decay.dtype == jnp.float32
    # exp of a float32 sum of 16 logs: 2e-6 relative; a bfloat16 decay would be off by ~4e-3.
    np.testing.assert_allclose(decay, 0.5**c, rtol=1e-5)


@pytest.mark.parametrize(
    ("gated", "alphas", "c"),
    [(False, None, 16), (True, (0.8, 1.0), 16), (True, (1e-3, 1e-3), 32)],
    ids=["delta", "gated", "gated-fast-decay"],
)
def test_phase1_backward_equals_autodiff_of_phase1(gated, alphas, c):
    """:func:`~fwjax.ops.pallas.chunk_math.wy_chunk_backward` (the phased schedule's phase-1
    VJP kernel) equals autodiff of :func:`~fwjax.ops.pallas.chunk_math.wy_chunk` in float64,
    with random cotangents of every operand, a zero β among the steps, ``K ≠ V``, and gates
    from mild to a decay across the chunk that float32 would flush to zero."""
    from fwjax.ops.pallas import chunk_math as cm
    from tests.jax_compat import enable_x64

    rng = np.random.default_rng(5)
    dk, dv = 8, 12
    with enable_x64(True):
        f64 = jnp.float64
        normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, f64)
        q, k, v = normal(c, dk, scale=0.4), normal(c, dk, scale=0.4), normal(c, dv)
        beta = jnp.asarray(rng.uniform(0.1, 1.5, (c, 1)), f64).at[3].set(0.0)
        alpha = rng.uniform(*(alphas or (1.0, 1.0)), (c, 1))
        g = jnp.cumsum(jnp.asarray(np.log(alpha), f64), axis=0)

        def phase1(q, k, v, beta, g):
            if gated:
                return cm.wy_chunk(q, k, v, beta, beta.T, f64, g_col=g, g_row=g.T)
            return (q, k, *cm.wy_chunk(q, k, v, beta, beta.T, f64))

        terms, vjp = jax.vjp(phase1, q, k, v, beta, g)
        cotangents = tuple(normal(*t.shape) for t in terms)
        want = vjp(cotangents)
        extra = dict(g_col=g, g_row=g.T, d_decay=cotangents[5]) if gated else {}
        got = cm.wy_chunk_backward(q, k, v, beta, beta.T, *cotangents[:5], f64, **extra)
        names = ("q", "k", "v", "beta", "log Γ")[: len(got)]
        assert len(got) == 4 + gated
        for name, a, b in zip(names, got, want, strict=False):
            assert np.isfinite(a).all(), name
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
        # No matrix-vector products (Triton lowers only dots whose dimensions are all ≥ 16).
        closed = jax.make_jaxpr(cm.wy_chunk_backward, static_argnums=10)(
            q, k, v, beta, beta.T, *cotangents[:5], f64, **extra
        )  # fmt: skip
        shapes = [
            [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
            for eqn in _equations(closed.jaxpr)
            if eqn.primitive.name == "dot_general"
        ]
        assert shapes and all(1 not in shape for eqn in shapes for shape in eqn), shapes


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it (loop bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)
