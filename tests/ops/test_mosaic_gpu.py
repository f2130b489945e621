"""``PallasBackend.MOSAIC_GPU``: the phased (gated) delta rule's Mosaic GPU kernels.

On CPU each kernel runs in Mosaic GPU's interpreter against its XLA form, the whole op against
CHUNKED, and every kernel is lowered for CUDA (``jax.export``: Pallas → Mosaic GPU, no device).
``-m gpu`` runs them compiled where a GPU is the default backend
(``JAX_PLATFORMS=cuda pytest -m gpu tests/ops/test_mosaic_gpu.py``).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl
from fwjax.ops.pallas import (
    PallasBackend,
    PallasChain,
    PallasOptions,
    PallasPrecision,
    PallasSchedule,
    kernel_config,
)
from tests.ops.rules import DELTA, GATED, Case
from tests.ops.test_pallas import (
    GPU_CASES,
    RULE_IDS,
    TARGETS,
    _assert_lowered_through,
    _compare,
    _custom_calls,
    _lowered_text,
)
from tests.tolerances import assert_close

PHASED = PallasSchedule.PHASED
AFFINE = PallasChain.AFFINE

MOSAIC_GPU = PallasOptions(backend=PallasBackend.MOSAIC_GPU, schedule=PHASED)
# The kernel tests' sizes: B 2, 3 chunks of 64, K 128 (K ≠ C), V 128 in two value tiles of 64.
MGPU_DIMS = (2, 1, 3, 64, 128, 128)


def _xla_chain(k, w, u, s0, c):
    """The forward chain of :func:`~fwjax.ops.pallas.chunk_math.chain_forward` in XLA, over
    chunks of ``c`` rows; returns ``(final, states)``."""
    from fwjax.ops.pallas import chunk_math as cm

    md = k.dtype
    chunks = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], -1, c, x.shape[-1]), 2, 0)

    def step(s, x):
        chain = jax.vmap(jax.vmap(lambda k, w, u, s: cm.chain_forward(k, w, u, s, md, s.dtype)))
        return chain(*x, s), s.astype(md)

    final, states = jax.lax.scan(step, s0, (chunks(k), chunks(w), chunks(u)))
    return final, jnp.moveaxis(states, 0, 2)


@pytest.mark.parametrize("save_states", [True, False])
def test_mosaic_gpu_chain_kernel_equals_the_chain_in_xla(save_states):
    """``MGPU_DIMS`` (two CTAs per head), bfloat16 operands and a float32 state, against the
    XLA chain. Both form exact bfloat16 products
    summed in float32, in different orders: an ``X = U − W S`` element on a bfloat16 rounding
    boundary may round the other way and move its column of the state by one rounding; the
    rest agrees to float32 rounding."""
    from fwjax.ops.pallas.mosaic_gpu import delta_chain_forward

    b, h, n, c, k, v = MGPU_DIMS
    rng = np.random.default_rng(0)
    normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
    keys = normal(b, h, n * c, k, scale=k**-0.5).astype(jnp.bfloat16)
    w = normal(b, h, n * c, k, scale=k**-0.5).astype(jnp.bfloat16)
    u = normal(b, h, n * c, v).astype(jnp.bfloat16)
    s0 = normal(b, h, k, v)
    kw = {"chunk": c, "value_block": 64, "save": save_states, "interpret": True}
    got = delta_chain_forward(keys, w, u, s0, **kw)
    final, states = _xla_chain(keys, w, u, s0, c)
    assert len(got) == (2 if save_states else 1)
    pairs = [(got[0], final)]
    if save_states:
        assert got[1].dtype == jnp.bfloat16 and got[1].shape == (b, h, n, k, v)
        pairs.append((got[1], states))
    for actual, expected in pairs:
        assert_close(actual, expected, jnp.bfloat16)
        actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
        same = np.abs(actual - expected) <= 1e-6 * np.abs(expected).max()
        assert same.mean() > 0.98, same.mean()


def _xla_cotangent_chain(p, k, q, w, do, g0):
    """The cotangent chain of :func:`~fwjax.ops.pallas.chunk_math.chain_backward` in XLA,
    from the last chunk; returns ``(∂L/∂S⁰, gs)``."""
    from fwjax.ops.pallas import chunk_math as cm

    md, c = k.dtype, p.shape[-1]
    chunks = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], -1, c, x.shape[-1]), 2, 0)

    def step(g, x):
        chain = jax.vmap(jax.vmap(lambda *a: cm.chain_backward(*a, md, g.dtype)))
        return chain(*x, g), g.astype(md)

    xs = (chunks(q), chunks(k), chunks(w), chunks(p), chunks(do))
    d_s0, gs = jax.lax.scan(step, g0, xs, reverse=True)
    return d_s0, jnp.moveaxis(gs, 0, 2)


def test_mosaic_gpu_cotangent_chain_kernel_equals_the_chain_in_xla():
    """The reverse chain ``G ← G + Qᵀ Ō − Wᵀ (Pᵀ Ō + K G)``, sizes and check as above."""
    from fwjax.ops.pallas.mosaic_gpu import delta_chain_backward

    b, h, n, c, k, v = MGPU_DIMS
    rng = np.random.default_rng(1)
    normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
    bf16 = lambda x: x.astype(jnp.bfloat16)
    tril = jnp.tril(jnp.ones((c, c), bool))
    p = bf16(jnp.where(jnp.tile(tril, (n, 1)), normal(b, h, n * c, c, scale=c**-0.5), 0))
    keys, q, w = (bf16(normal(b, h, n * c, k, scale=k**-0.5)) for _ in range(3))
    do, g0 = bf16(normal(b, h, n * c, v)), normal(b, h, k, v)
    got = delta_chain_backward(p, keys, q, w, do, g0, value_block=64, save=True, interpret=True)
    want = _xla_cotangent_chain(p, keys, q, w, do, g0)
    assert got[1].dtype == jnp.bfloat16 and got[1].shape == (b, h, n, k, v)
    for actual, expected in zip(got, want, strict=True):
        assert_close(actual, expected, jnp.bfloat16)
        actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
        same = np.abs(actual - expected) <= 1e-6 * np.abs(expected).max()
        assert same.mean() > 0.98, same.mean()


def test_mosaic_gpu_output_kernel_equals_the_chunk_output_in_xla():
    """``O = Q S + P (U − W S)`` at ``MGPU_DIMS``, one CTA per chunk and value tile, against
    :func:`~fwjax.ops.pallas.chunk_math.chunk_output` rounded to bfloat16 like the kernel's."""
    from fwjax.ops.pallas import chunk_math as cm
    from fwjax.ops.pallas.mosaic_gpu_chunks import delta_chunk_output

    b, h, n, c, k, v = MGPU_DIMS
    rng = np.random.default_rng(2)
    normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
    bf16 = lambda x: x.astype(jnp.bfloat16)
    q = bf16(normal(b, h, n * c, k, scale=k**-0.5))
    w = bf16(normal(b, h, n * c, k, scale=k**-0.5))
    u = bf16(normal(b, h, n * c, v))
    p = bf16(jnp.tril(normal(b, h, n * c, c, scale=c**-0.5)))  # per chunk: [C, C] blocks
    states = bf16(normal(b, h, n, k, v))
    got = delta_chunk_output(q, w, u, p, states, value_block=64, interpret=True)
    per_chunk = lambda x: x.reshape(b, h, n, c, x.shape[-1])
    output = lambda *a: cm.chunk_output(*a, jnp.bfloat16, jnp.float32)
    want = jax.vmap(jax.vmap(jax.vmap(output)))(*map(per_chunk, (q, w, u, p)), states)
    assert got.dtype == jnp.bfloat16 and got.shape == u.shape
    actual, expected = np.asarray(got, np.float32), np.asarray(bf16(want), np.float32)
    assert_close(actual, expected.reshape(actual.shape), jnp.bfloat16)
    assert (actual == expected.reshape(actual.shape)).mean() > 0.98


def test_mosaic_gpu_gradient_kernel_equals_the_chunk_gradients_in_xla():
    """``Q̄, K̄, W̄, Ū, P̄`` and the row sums of ``S ⊙ G`` (the gated rule's ``Γ̄_C``) at
    ``MGPU_DIMS`` (K ≠ C, the whole V 128 per CTA), one CTA per chunk, against
    :func:`~fwjax.ops.pallas.chunk_math.chunk_gradients`: the same bfloat16 roundings of
    ``Ũ`` and ``Ũ̄`` and float32 sums, so every element agrees to float32 rounding. (Through
    the whole op, ``Γ̄_C`` is a small part of ``∂L/∂α``, below the bfloat16 tolerance.)"""
    from fwjax.ops.pallas import chunk_math as cm
    from fwjax.ops.pallas.mosaic_gpu_chunks import delta_chunk_gradients

    b, h, n, c, k, v = MGPU_DIMS
    rng = np.random.default_rng(3)
    normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
    bf16 = lambda x: x.astype(jnp.bfloat16)
    q, keys, w = (bf16(normal(b, h, n * c, k, scale=k**-0.5)) for _ in range(3))
    u, do = bf16(normal(b, h, n * c, v)), bf16(normal(b, h, n * c, v))
    p = bf16(normal(b, h, n * c, c, scale=c**-0.5))
    states, gs = bf16(normal(b, h, n, k, v)), bf16(normal(b, h, n, k, v))
    got = delta_chunk_gradients(keys, w, u, p, states, gs, do, decay=True, interpret=True)
    assert [g.shape for g in got] == [(b, h, n * c, k)] * 3 + [u.shape, p.shape, (b, h, n, k)]
    assert all(g.dtype == jnp.float32 for g in got)

    per_chunk = lambda x: x.reshape(b, h, n, c, x.shape[-1])
    grads = lambda *a: cm.chunk_gradients(*a, jnp.bfloat16, jnp.float32, decay=jnp.ones((1, 1)))
    args = (*map(per_chunk, (q, keys, w, u, p)), states, per_chunk(do), gs)
    want = jax.vmap(jax.vmap(jax.vmap(grads)))(*args)
    causal = np.tile(np.tril(np.ones((c, c), bool)), (n, 1))
    got = (*got[:4], np.where(causal, got[4], 0), np.sum(got[5], axis=-1))  # P̄ ⊙ M, Σ rows
    for name, actual, expected in zip(["dq", "dk", "dw", "du", "dp", "dΓ"], got, want, strict=True):
        expected = np.asarray(expected)
        actual = np.asarray(actual).reshape(expected.shape)
        atol = 1e-5 * np.abs(expected).max()
        np.testing.assert_allclose(actual, expected, atol=atol, err_msg=name)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_mosaic_gpu_wy_kernel_equals_the_wy_terms_in_xla(gated):
    """Phase 1 at ``MGPU_DIMS`` (unit keys, β ∈ (0, 1), the gated rule's α ∈ (0.9, 1)) against
    :func:`~fwjax.ops.pallas.chunk_math.wy_chunk` in float32: the kernel's triangular inverse
    and its split-operand products keep ``W`` and ``U`` within one bfloat16 rounding of the
    float32 values (> 99 % of elements equal after it), ``P``, ``Q'`` and ``K'`` equal."""
    from fwjax.ops.pallas import chunk_math as cm
    from fwjax.ops.pallas.mosaic_gpu_chunks import delta_wy

    b, h, n, c, k, v = MGPU_DIMS
    rng = np.random.default_rng(4)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    keys = rng.normal(size=(b, h, n * c, k))
    keys = bf16(keys / np.linalg.norm(keys, axis=-1, keepdims=True))
    q = bf16(rng.normal(size=(b, h, n * c, k)) * k**-0.5)
    values = bf16(rng.normal(size=(b, h, n * c, v)))
    beta = jnp.asarray(rng.uniform(0, 1, (b, h, n * c)), jnp.float32)
    g = None
    if gated:
        log_alpha = np.log(rng.uniform(0.9, 1.0, (b, h, n, c)))
        g = jnp.asarray(np.cumsum(log_alpha, axis=-1).reshape(b, h, n * c), jnp.float32)
    got = delta_wy(q, keys, values, beta, g, chunk=c, interpret=True)

    per_chunk = lambda x: x.reshape(b, h, n, c, -1)
    column, row = (lambda x: x.reshape(b, h, n, c, 1)), (lambda x: x.reshape(b, h, n, 1, c))
    gates = {"g_col": column(g), "g_row": row(g)} if gated else {}
    terms = lambda *a, **kw: cm.wy_chunk(*a, jnp.float32, **kw)
    args = (per_chunk(q), per_chunk(keys), per_chunk(values), column(beta), row(beta))
    want = jax.vmap(jax.vmap(jax.vmap(terms)))(*args, **gates)
    names = ("q'", "k'", "w", "u", "p") if gated else ("w", "u", "p")
    assert len(got) == len(names)
    for name, actual, expected in zip(names, got, want, strict=False):
        assert actual.dtype == jnp.bfloat16 and actual.shape == (b, h, n * c, expected.shape[-1])
        actual = np.asarray(actual, np.float32).reshape(expected.shape)
        rounded = np.asarray(bf16(expected), np.float32)
        # One bfloat16 rounding step, or float32 rounding of the largest terms (elements near 0).
        step = np.abs(rounded) * 2.0**-7 + 1e-5 * np.abs(expected).max()
        assert (np.abs(actual - rounded) <= step).all(), name
        assert (actual == rounded).mean() > (0.99 if name in "wu" else 1 - 1e-9), name


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_mosaic_gpu_phase1_vjp_kernel_equals_autodiff_of_phase1(gated):
    """Phase 1's VJP by the Mosaic GPU kernel (``delta_wy_backward`` with the XLA terms around
    it, :func:`fwjax.ops.pallas.phased.phase1_backward`) against autodiff of the rule's XLA
    phase 1 in float32, from the same bfloat16-valued inputs and random cotangents of every
    operand: B 2, two chunks of 64, K 64 ≠ V 128, a zero β, the gated rule's α ∈ (0.9, 1).
    Within 5e-5 of each cotangent's largest element (the split operands keep about 16 bits;
    5e-6 measured)."""
    from fwjax.ops.delta_rule.pallas import KERNEL as DELTA_KERNEL
    from fwjax.ops.gated_delta_rule.pallas import KERNEL as GATED_KERNEL
    from fwjax.ops.pallas import phased

    rule = GATED_KERNEL if gated else DELTA_KERNEL
    b, h, n, c, dk, dv = 2, 1, 2, 64, 64, 128
    rng = np.random.default_rng(6)
    f32 = jnp.float32
    rounded = lambda x: jnp.asarray(x, jnp.bfloat16).astype(f32)
    keys = rng.normal(size=(b, h, n, c, dk))
    xs = (
        rounded(rng.normal(size=(b, h, n, c, dk)) * dk**-0.5),
        rounded(keys / np.linalg.norm(keys, axis=-1, keepdims=True)),
        rounded(rng.normal(size=(b, h, n, c, dv))),
        jnp.asarray(rng.uniform(0, 1, (b, h, n, c)), f32).at[:, :, 0, 5].set(0.0),
    )
    if gated:
        xs += (jnp.asarray(np.log(rng.uniform(0.9, 1.0, (b, h, n, c))), f32),)
    cfg = kernel_config(MOSAIC_GPU, n * c, dk, dv, c, b * h, jnp.bfloat16, f32, phased=True)
    terms, vjp = jax.vjp(rule.phase1, *xs)
    cotangents = tuple(jnp.asarray(rng.normal(size=t.shape), f32) for t in terms)
    want = vjp(cotangents)
    got = phased.phase1_backward(rule, cfg, xs, cotangents, f32)
    assert len(got) == len(want) == 4 + gated
    for name, actual, expected in zip(("q", "k", "v", "β", "log α"), got, want, strict=False):
        expected = np.asarray(expected)
        atol = 5e-5 * np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(actual), expected, atol=atol, err_msg=name)


def test_mosaic_gpu_affine_kernels_equal_their_xla_forms():
    """``PallasChain.AFFINE`` at ``MGPU_DIMS``: the maps ``M = Γ_C I − Kᵀ W``, ``B = Kᵀ U``
    and ``H = Qᵀ Ō − Wᵀ Pᵀ Ō`` (gated: Γ_C ∈ (0.5, 1); the delta rule's ``M``, Γ_C = 1) equal
    :func:`~fwjax.ops.pallas.chunk_math.chain_maps` and ``cotangent_inputs`` to float32
    rounding; the chains ``S ← M S + B`` and ``G ← Mᵀ G + H`` (two value tiles) agree with
    the XLA chains to float32 rounding in > 99 % of elements (the rest: a carry element on a
    bfloat16 rounding boundary of the MMA operand)."""
    from fwjax.ops.pallas import chunk_math as cm
    from fwjax.ops.pallas.mosaic_gpu import affine_chain, decay_rows
    from fwjax.ops.pallas.mosaic_gpu_chunks import affine_maps

    b, h, n, c, k, v = MGPU_DIMS
    rng = np.random.default_rng(5)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    normal = lambda *shape, scale=1.0: bf16(rng.normal(size=shape) * scale)
    keys, w, q = (normal(b, h, n * c, k, scale=k**-0.5) for _ in range(3))
    u, do = normal(b, h, n * c, v), normal(b, h, n * c, v)
    causal = np.tile(np.tril(np.ones((c, c), bool)), (n, 1))
    p = bf16(np.where(causal, rng.normal(size=(b, h, n * c, c)) * c**-0.5, 0))
    decay = jnp.asarray(rng.uniform(0.5, 1.0, (b, h, n, 1, 1)), jnp.float32)
    maps = functools.partial(affine_maps, keys, w, decay_rows(decay), chunk=c, interpret=True)
    m, b_fwd = maps(u=u, name="maps")
    m_bwd, h_bwd = maps(q=q, p=p, do=do, name="maps_bwd")
    m_delta, _ = affine_maps(keys, w, None, chunk=c, u=u, interpret=True, name="maps_delta")

    md, sd = jnp.bfloat16, jnp.float32
    per_chunk = lambda x: x.reshape(b, h, n, c, x.shape[-1])
    each = lambda f, *a: jax.vmap(jax.vmap(jax.vmap(f)))(*map(per_chunk, a[:-1]), a[-1])
    want_m, want_b = each(lambda *x: cm.chain_maps(*x[:3], md, sd, x[3]), keys, w, u, decay)
    want_m_delta = each(lambda *x: cm.chain_map(*x[:2], md, sd), keys, w, decay)  # Γ_C = 1
    inputs = each(lambda *x: cm.cotangent_inputs(*x[:4], md, sd), q, w, p, do, decay)
    for name, actual, expected in [
        ("M", m, bf16(want_m)), ("B", b_fwd, want_b), ("M (bwd)", m_bwd, bf16(want_m)),
        ("H", h_bwd, inputs), ("M (delta)", m_delta, bf16(want_m_delta)),
    ]:  # fmt: skip
        expected = np.asarray(expected, np.float32)
        actual, atol = np.asarray(actual, np.float32), 1e-6 * np.abs(expected).max()
        # M is rounded to bfloat16 after float32 sums in either order: one rounding step apart.
        rtol = 2.0**-8 if name.startswith("M") else 0.0
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)

    s0 = jnp.asarray(rng.normal(size=(b, h, k, v)), jnp.float32)
    for transpose, terms in ((False, b_fwd), (True, h_bwd)):
        got = affine_chain(
            m, terms, s0, transpose=transpose, value_block=64, save=True, interpret=True,
            name="chain",
        )  # fmt: skip
        step = cm.chain_affine_backward if transpose else cm.chain_affine

        def scan_step(s, x, step=step):
            chain = jax.vmap(jax.vmap(lambda m_, t_, s_: step(m_, t_, s_, md, sd)))
            return chain(*x, s), s.astype(md)

        xs = (jnp.moveaxis(m, 2, 0), jnp.moveaxis(terms, 2, 0))
        final, saved = jax.lax.scan(scan_step, s0, xs, reverse=transpose)
        for actual, expected in ((got[0], final), (got[1], jnp.moveaxis(saved, 0, 2))):
            actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
            assert_close(actual, expected, jnp.bfloat16)
            same = np.abs(actual - expected) <= 1e-6 * np.abs(expected).max()
            assert same.mean() > 0.99, (transpose, same.mean())


@pytest.mark.parametrize(
    ("rule", "chain"),
    [(DELTA, PallasChain.UPDATE), (GATED, PallasChain.UPDATE), (GATED, AFFINE)],
    ids=["delta", "gated", "gated-affine"],
)
def test_mosaic_gpu_phased_rules_match_chunked(rule, chain):
    """The whole op with the Mosaic GPU kernels (phase 1, the chains forward and backward, in
    either form, the outputs and the gradients), split into 2 segments (T 150: 3 chunks of
    64, padded to 4; the widened passes without saved carries, then the reruns that save
    them): outputs, final state and every gradient against CHUNKED at the bfloat16
    tolerance. K 32 and V 48 pad to 64. The gated rule's chains read each chunk's decay
    ``Γ_C`` in float32. (One head: the interpreter runs CTAs one by one; the kernel tests
    cover B > 1.)"""
    case = Case(b=1, t=150, h=1, k=32, v=48, chunk=64)
    split = dataclasses.replace(rule, state_segments=2)
    options = dataclasses.replace(MOSAIC_GPU, chain=chain)
    _compare(split, case, jnp.bfloat16, options, tol_dtype=jnp.bfloat16, reference=rule)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("segments", "chain"),
    [(None, PallasChain.UPDATE), (4, PallasChain.UPDATE), (None, AFFINE), (4, AFFINE)],
)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("rule", [DELTA, GATED], **RULE_IDS)
def test_compiled_mosaic_gpu(rule, case, segments, chain):
    """The Mosaic GPU kernels compiled (Hopper), with and without the split, and the affine
    chains, against CHUNKED."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU default backend (JAX_PLATFORMS=cuda)")
    split = dataclasses.replace(rule, state_segments=segments)
    options = dataclasses.replace(MOSAIC_GPU, chain=chain)
    _compare(split, case, jnp.bfloat16, options, tol_dtype=jnp.bfloat16, reference=rule)


@pytest.mark.parametrize(
    ("name", "b", "h", "d", "segments", "chain"),
    [
        ("delta_rule", 1, 2, 16, 2, PallasChain.UPDATE),
        ("gated_delta_rule", 1, 2, 16, 2, PallasChain.UPDATE),
        ("delta_rule", 8, 16, 128, None, PallasChain.UPDATE),
        ("gated_delta_rule", 2, 4, 128, None, PallasChain.UPDATE),
        ("gated_delta_rule", 1, 2, 128, 2, AFFINE),
    ],
    ids=[
        "delta-padded-split", "gated-padded-split", "delta-B8H16D128", "gated-D128",
        "gated-affine-D128-split",
    ],
)  # fmt: skip
def test_mosaic_gpu_kernel_lowers_for_cuda_on_this_machine(
    monkeypatch, name, b, h, d, segments, chain
):
    """Every kernel of the op lowers through Mosaic GPU, none through Triton (``jax.export``
    for CUDA: Pallas → Mosaic GPU, which checks each kernel's shared memory against Hopper's;
    no PTX compiler or device): D 16 padded to 64 with both passes of each split chain (the gated
    rule's chains with their decay rows), K = V = 128 at B·H = 128 (its default value tile),
    the gated rule at K = V = 128, and the affine chains and their maps (split)."""
    import fwjax.ops.pallas as pallas_module
    from fwjax import ops

    monkeypatch.setattr(pallas_module, "resolve_interpret", lambda options, platform=None: False)
    x = jnp.ones((b, 130, h, d), jnp.bfloat16)
    gate = jnp.full((b, 130, h), 0.9, jnp.bfloat16)
    gates = (gate, gate) if name == "gated_delta_rule" else (gate,)

    def op(q, k, v):
        options = dataclasses.replace(MOSAIC_GPU, chain=chain)
        kw = {"impl": Impl.PALLAS, "pallas": options, "state_segments": segments}
        return getattr(ops, name)(q, k, v, *gates, None, 0.25, **kw)

    monkeypatch.setitem(TARGETS, "cuda", (*TARGETS["cuda"], "mosaic_gpu_v2"))
    text = _lowered_text(op, (x, x, x), "cuda")
    calls = _custom_calls(text)
    assert not [call for call in calls if "triton" in call]  # all Mosaic GPU's
    kernels = ["wy", "chain_fwd", "out", "chain_bwd", "grads", "wy_bwd"]
    kernels += ["chain_fwd_maps", "chain_bwd_maps"] if segments else []
    kernels += ["affine", "affine_bwd"] if chain is AFFINE else []
    for kernel in kernels:
        _assert_lowered_through(calls, f"{name}_{kernel}", "mosaic_gpu_v2")


def test_mosaic_gpu_kernels_over_whole_values_take_c_64_and_k_v_up_to_128():
    """Phase 1 and the gradients hold ``[C, C]`` and ``[C, max(K, V)]`` float32 values in one
    warpgroup's registers: C 64 with K, V <= 128; C 128 (which the chains' shared memory admits
    at K 64) and V 256 go to the Triton kernels."""
    from fwjax.ops.pallas.mosaic_gpu import SMEM_LIMIT, smem_bytes
    from fwjax.ops.pallas.mosaic_gpu_chunks import gradients_supported, wy_supported

    for supported in (wy_supported, gradients_supported):
        assert supported(64, 128, 128) and supported(64, 64, 64)
        assert not supported(64, 64, 256) and not supported(128, 64, 64)
    assert smem_bytes(128, 64, 64) <= SMEM_LIMIT  # the chains do run C 128 at K 64


def test_mosaic_gpu_wide_values_take_the_triton_kernels_parallel_over_chunks(monkeypatch):
    """V 256 (``C·V`` over one warpgroup's registers): phase 1, its VJP and the gradients lower
    through Triton, the chains and the outputs (value tiles of 64) through Mosaic GPU."""
    import fwjax.ops.pallas as pallas_module
    from fwjax import ops

    monkeypatch.setattr(pallas_module, "resolve_interpret", lambda options, platform=None: False)
    qk, v = jnp.ones((1, 130, 2, 64), jnp.bfloat16), jnp.ones((1, 130, 2, 256), jnp.bfloat16)
    beta = jnp.full((1, 130, 2), 0.9, jnp.bfloat16)

    def op(q, k, v):
        return ops.delta_rule(q, k, v, beta, None, 0.25, impl=Impl.PALLAS, pallas=MOSAIC_GPU)

    monkeypatch.setitem(TARGETS, "cuda", (*TARGETS["cuda"], "mosaic_gpu_v2"))
    calls = _custom_calls(_lowered_text(op, (qk, qk, v), "cuda"))
    for kernel in ("wy", "chain_fwd", "out", "chain_bwd", "grads", "wy_bwd"):
        target = "__gpu$xla.gpu.triton" if kernel in ("wy", "grads", "wy_bwd") else "mosaic_gpu_v2"
        _assert_lowered_through(calls, f"delta_rule_{kernel}", target)


@pytest.mark.parametrize(
    ("options", "dtype", "d", "chunk", "message"),
    [
        (PallasOptions(backend=PallasBackend.MOSAIC_GPU), jnp.bfloat16, 4, 64, "schedule='fused'"),
        (MOSAIC_GPU, jnp.float32, 4, 64, "got float32"),
        (
            dataclasses.replace(MOSAIC_GPU, precision=PallasPrecision.STATE),
            jnp.bfloat16,
            4,
            64,
            "got float32",
        ),
        (MOSAIC_GPU, jnp.bfloat16, 128, 128, "chunk=128, key=128, value_block=64 needs 327680"),
        (MOSAIC_GPU, jnp.bfloat16, 256, 64, "key=256, value_block=64 needs 270336"),
    ],
    ids=["fused", "float32_inputs", "state_precision", "chunk128", "key256"],
)
def test_mosaic_gpu_refuses_what_it_has_no_kernel_for(options, dtype, d, chunk, message):
    """Options without Mosaic GPU kernels, and sizes whose kernels would not fit Hopper's
    shared memory (the cotangent chain holds two chunks of five operands in flight), raise
    ValueError naming the values."""
    from fwjax.ops import delta_rule

    x = jnp.ones((1, 200, 1, d), dtype)
    beta = jnp.full((1, 200, 1), 0.5, dtype)
    with pytest.raises(ValueError, match=message):
        delta_rule(x, x, x, beta, impl=Impl.PALLAS, chunk_size=chunk, pallas=options)


def test_mosaic_gpu_refuses_the_rules_it_has_no_kernels_for():
    from fwjax.ops import sum_rule

    x = jnp.ones((1, 8, 1, 4), jnp.bfloat16)
    with pytest.raises(ValueError, match="no kernels for 'sum_rule'"):
        sum_rule(x, x, x, impl=Impl.PALLAS, pallas=MOSAIC_GPU)


def test_mosaic_gpu_names_the_jax_it_needs(monkeypatch):
    from fwjax.ops.pallas.mosaic_gpu import check_supported

    monkeypatch.setattr(jax, "__version__", "0.9.2")
    with pytest.raises(ValueError, match=r"needs jax >= 0\.10, found 0\.9\.2"):
        check_supported(jnp.bfloat16, jnp.float32, 64, 64, 64)


@pytest.mark.parametrize(
    ("batch", "heads", "error"),
    [(2, 40_000, None), (70_000, 1, "over the limits")],
    ids=["B·H-over-65535", "B-over-65535"],
)
def test_mosaic_gpu_kernels_parallel_over_chunks_launch_within_cudas_grid(batch, heads, error):
    """CUDA caps grid y and z at 65535: the 4-D grids keep ``B`` and ``H·V/tv`` on those
    axes (not ``B·H``, which a flattened ``(b, h, ·, ·)`` grid would put on z), and a batch
    over the cap raises ValueError naming the grid."""
    from fwjax.ops.pallas.mosaic_gpu import cuda_grid
    from fwjax.ops.pallas.mosaic_gpu_chunks import affine_maps, delta_chunk_output

    assert cuda_grid((3, 5, 7, 11)) == (11, 7, 15) and cuda_grid((7, 11)) == (11, 7, 1)
    c = d = 64
    seq = lambda width: jax.ShapeDtypeStruct((batch, heads, c, width), jnp.bfloat16)
    states = jax.ShapeDtypeStruct((batch, heads, 1, d, d), jnp.bfloat16)
    kernels = (
        lambda: jax.eval_shape(
            functools.partial(delta_chunk_output, value_block=d, interpret=False),
            seq(d), seq(d), seq(d), seq(c), states,
        ),
        lambda: jax.eval_shape(
            functools.partial(affine_maps, chunk=c, interpret=False, name="maps"),
            seq(d), seq(d), u=seq(d),
        ),
    )  # fmt: skip
    for kernel in kernels:
        if error is None:
            kernel()
        else:
            with pytest.raises(ValueError, match=error):
                kernel()


@pytest.mark.parametrize(
    ("version", "platform", "options", "dtype", "d", "phased", "expected"),
    [
        ("0.11.0", "gpu", PallasOptions(schedule=PHASED), jnp.bfloat16, 64, True, "mosaic_gpu"),
        ("0.12.1", "gpu", PallasOptions(schedule=PHASED), jnp.float16, 128, True, "mosaic_gpu"),
        ("0.10.2", "gpu", PallasOptions(schedule=PHASED), jnp.bfloat16, 64, True, "triton"),
        ("0.11.0", "gpu", PallasOptions(), jnp.bfloat16, 64, True, "triton"),  # FUSED
        ("0.11.0", "gpu", PallasOptions(schedule=PHASED), jnp.float32, 64, True, "triton"),
        ("0.11.0", "gpu", PallasOptions(schedule=PHASED), jnp.bfloat16, 256, True, "triton"),
        ("0.11.0", "gpu", PallasOptions(schedule=PHASED), jnp.bfloat16, 64, False, "triton"),
        ("0.11.0", "tpu", PallasOptions(schedule=PHASED), jnp.bfloat16, 64, True, "mosaic_tpu"),
        ("0.11.0", "cpu", PallasOptions(schedule=PHASED), jnp.bfloat16, 64, True, "triton"),
    ],
    ids=[
        "jax0.11", "jax0.12-float16-D128", "jax0.10", "fused", "float32", "D256-over-smem",
        "not-phased", "tpu", "cpu",
    ],
)  # fmt: skip
def test_auto_takes_mosaic_gpu_where_jax_deprecates_triton(
    monkeypatch, version, platform, options, dtype, d, phased, expected
):
    """``PallasBackend.AUTO`` on a GPU: Mosaic GPU from JAX 0.11 (which deprecates the Triton
    lowering) for every call it has kernels for; Triton, the fallback, for the rest and on
    older JAX."""
    monkeypatch.setattr(jax, "__version__", version)
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    sizes = (4096, d, d, 64, 16, dtype, jnp.float32)
    cfg = kernel_config(options, *sizes, phased=phased)
    assert cfg.backend is PallasBackend(expected)
