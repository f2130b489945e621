"""The split state scan (fwjax.ops.state_split): P parallel segments compute what the sequential
scan computes. The delta rule's CHUNKED form with ``state_segments`` is also in the shared parity
suite (tests/ops/test_parity.py, rule ``delta_split``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import Impl, delta_rule, gated_delta_rule
from fwjax.ops.state_split import pad_chunks, resolve_segments, segmented_scan
from tests.jax_compat import enable_x64
from tests.oracle import delta_rule_np, gated_delta_rule_np
from tests.tolerances import assert_close


def _affine_scan_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(0.5 * rng.normal(size=(n, 2, 4, 4)), jnp.float64)  # A_x, per batch element
    b = jnp.asarray(rng.normal(size=(n, 2, 4, 3)), jnp.float64)
    c0 = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float64)
    return (a, b), c0


def _step(c, x):
    a, b = x
    c_new = a @ c + b
    return c_new, (jnp.sum(c * c_new, axis=-1), c)  # an output and the carry before the step


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("segments", [1, 2, 3, 6])
def test_segments_compute_what_the_sequential_scan_computes(segments, reverse):
    with enable_x64(True):
        xs, c0 = _affine_scan_inputs(6)
        chain = lambda c, x: _step(c, x)[0]
        linear = lambda m, x: x[0] @ m
        expected = jax.lax.scan(_step, c0, xs, reverse=reverse)
        got = segmented_scan(_step, chain, linear, c0, xs, segments, reverse=reverse)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_segments_must_divide_the_chunks_and_padding_makes_them():
    with enable_x64(True):
        xs, c0 = _affine_scan_inputs(5)
    with pytest.raises(ValueError, match="segments=2 must be a positive divisor"):
        segmented_scan(_step, None, None, c0, xs, 2)
    padded, n = pad_chunks(xs, 2)
    assert n == 5 and padded[0].shape[0] == 6 and not np.any(padded[0][5])


def test_resolve_segments():
    assert resolve_segments(None, 10) == 1
    assert resolve_segments(4, 10) == 4
    assert resolve_segments(64, 10) == 10  # at most one segment per chunk
    assert resolve_segments(8, 9) == 5  # 5 segments of 2 chunks (1 padded), not 8 of 2 (7)
    with pytest.raises(ValueError, match="segments=0"):
        resolve_segments(0, 10)


def test_state_segments_is_validated_by_the_op():
    x = jnp.ones((1, 4, 1, 2))
    with pytest.raises(ValueError, match="state_segments"):
        delta_rule(x, x, x, jnp.ones((1, 4, 1)), impl=Impl.CHUNKED, state_segments=0)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_a_long_float32_sequence_drifts_no_more_than_the_sequential_scan(gated):
    """T 2048 in chunks of 16 (128 chunks) as 1 and 8 segments, float32, against the float64
    oracle: the segments' maps (products of 16 transitions) must not add error."""
    rng = np.random.default_rng(0)
    b, t, h, k, v = 1, 2048, 2, 8, 8
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, key = (unit(rng.normal(size=(b, t, h, k))) for _ in range(2))
    val = rng.normal(size=(b, t, h, v))
    beta = rng.uniform(0.05, 0.95, size=(b, t, h))
    alpha = rng.uniform(0.9, 1.0, size=(b, t, h))
    s0 = 0.5 * rng.normal(size=(b, h, k, v))
    if gated:
        expected_out, expected_state = gated_delta_rule_np(q, key, val, beta, alpha, s0, 1.0)
        op = lambda *a, **kw: gated_delta_rule(
            *a[:4], jnp.asarray(alpha, jnp.float32), *a[4:], **kw
        )
    else:
        expected_out, expected_state = delta_rule_np(q, key, val, beta, s0, 1.0)
        op = delta_rule
    args = [jnp.asarray(x, jnp.float32) for x in (q, key, val, beta, s0)]
    errors = {}
    for segments in (1, 8):
        out, state = op(*args, impl=Impl.CHUNKED, chunk_size=16, state_segments=segments)
        assert_close(out, expected_out, err_msg=f"output, {segments} segments")
        assert_close(state, expected_state, err_msg=f"state, {segments} segments")
        errors[segments] = float(np.max(np.abs(np.asarray(out) - expected_out)))
    # Split and sequential scans round differently; the split may not lose more than a small
    # factor of the sequential scan's own float32 error (measured: the same order of magnitude).
    assert errors[8] <= 4 * errors[1] + 1e-6, errors
