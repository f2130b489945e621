"""Feature maps and normalisations: exact definitions and their stated properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwjax.ops import FeatureMap, FeatureMapKind, feature_maps


def test_elu_p1_definition_and_positivity():
    x = jnp.linspace(-20, 5, 101)
    np.testing.assert_allclose(
        feature_maps.elu_p1(x), np.where(x > 0, x + 1, np.exp(x)), rtol=1e-6, atol=1e-7
    )
    assert jnp.all(feature_maps.elu_p1(x) > 0)


def _dpfp_np(x, nu):
    r = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    return np.concatenate([r * np.roll(r, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


@pytest.mark.parametrize("nu", [1, 2, 3, 5])
def test_dpfp_definition_dimension_and_non_negativity(nu):
    x = np.random.default_rng(nu).normal(size=(3, 4, 16)).astype(np.float32)
    phi = feature_maps.dpfp(jnp.asarray(x), nu)
    assert phi.shape == (3, 4, 2 * 16 * nu)
    assert jnp.all(phi >= 0)
    np.testing.assert_allclose(phi, _dpfp_np(x, nu), rtol=1e-6)


def test_dpfp_density_for_symmetric_inputs():
    """For i.i.d. symmetric inputs each feature r_i·r_{i-j} (j < d) is non-zero with probability
    1/4, so DPFP-ν has d·ν/2 non-zeros on average out of 2·d·ν: sparse by construction."""
    x = np.random.default_rng(0).normal(size=(4000, 64)).astype(np.float32)
    for nu in (1, 2, 3):
        nnz = float(jnp.mean(jnp.sum(feature_maps.dpfp(jnp.asarray(x), nu) > 0, axis=-1)))
        assert abs(nnz - 32 * nu) < 0.5, (nu, nnz)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0.01, 10), min_size=2, max_size=12),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_dpfp_opposite_sign_patterns_are_orthogonal(magnitudes, nu, seed):
    """Inputs whose signs are opposite in every coordinate map to orthogonal features."""
    rng = np.random.default_rng(seed)
    m = np.asarray(magnitudes, np.float32)
    signs = rng.choice([-1.0, 1.0], size=m.shape).astype(np.float32)
    x = signs * m
    y = -signs * rng.uniform(0.01, 10, size=m.shape).astype(np.float32)
    phi_x, phi_y = feature_maps.dpfp(jnp.asarray(x), nu), feature_maps.dpfp(jnp.asarray(y), nu)
    assert float(jnp.dot(phi_x, phi_y)) == 0.0
    assert jnp.all(phi_x >= 0) and jnp.all(phi_y >= 0)


def _dpfp_autodiff(x, nu):
    r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    return jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("nu", [1, 2, 3])
def test_dpfp_vjp_matches_autodiff_of_the_definition(nu, dtype):
    """The hand-written VJP equals JAX's autodiff through relu/roll, zeros of x included
    (relu'(0) = 0), with a random cotangent."""
    kx, kg = jax.random.split(jax.random.key(nu))
    x = jax.random.normal(kx, (2, 5, 8)).at[0, 0, :3].set(0.0).astype(dtype)
    g = jax.random.normal(kg, (2, 5, 16 * nu)).astype(dtype)
    got = jax.vjp(lambda x: feature_maps.dpfp(x, nu), x)[1](g)[0]
    want = jax.vjp(lambda x: _dpfp_autodiff(x, nu), x)[1](g)[0]
    assert got.dtype == want.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)
    assert np.all(np.float32(got)[0, 0, :3] == 0)


@pytest.mark.parametrize("nu", [0, -1, 1.5, True])
def test_dpfp_rejects_bad_nu(nu):
    with pytest.raises(ValueError, match="nu"):
        feature_maps.dpfp(jnp.ones(4), nu)


def test_favor_projection_is_blockwise_orthogonal():
    d, m = 8, 20
    r = feature_maps.draw_favor_projection(jax.random.key(0), d, m)
    assert r.shape == (d, m)
    directions = r / jnp.linalg.norm(r, axis=0)
    for start in range(0, m, d):
        block = directions[:, start : start + d]
        np.testing.assert_allclose(block.T @ block, np.eye(block.shape[1]), atol=1e-5)


@pytest.mark.slow  # 9-23 s (256 QR blocks); the orthogonality test above stays in the default suite
def test_favor_projection_column_norms_are_chi_distributed():
    """chi(d) norms: the mean of 4096 column norms is √(d − ½) (to O(1/d)) within ~5 standard
    errors."""
    big = feature_maps.draw_favor_projection(jax.random.key(1), 16, 4096)
    assert abs(float(jnp.mean(jnp.linalg.norm(big, axis=0))) - np.sqrt(16 - 0.5)) < 0.05


def test_favor_plus_definition():
    d, m = 6, 10
    r = np.asarray(feature_maps.draw_favor_projection(jax.random.key(2), d, m))
    x = np.random.default_rng(0).normal(size=(5, d)).astype(np.float32)
    xr = x @ r
    expected = (
        np.exp(-0.5 * np.sum(x**2, -1, keepdims=True))
        * np.concatenate([np.exp(xr), np.exp(-xr)], axis=-1)
        / np.sqrt(2 * m)
    )
    np.testing.assert_allclose(
        feature_maps.favor_plus(jnp.asarray(x), jnp.asarray(r)), expected, rtol=1e-5
    )


def test_favor_plus_is_an_unbiased_softmax_kernel_estimate():
    """E[φ(q)·φ(k)] = exp(q·k): the mean of independent estimates lies within 5 standard
    errors of the truth."""
    d, m, draws = 8, 512, 40
    rng = np.random.default_rng(0)
    q = jnp.asarray(0.4 * rng.normal(size=(6, d)), jnp.float32)
    k = jnp.asarray(0.4 * rng.normal(size=(6, d)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), draws)

    def estimate(key):
        r = feature_maps.draw_favor_projection(key, d, m)
        return jnp.sum(feature_maps.favor_plus(q, r) * feature_maps.favor_plus(k, r), -1)

    est = np.asarray(jax.jit(jax.vmap(estimate))(keys), np.float64)  # [draws, 6]
    truth = np.exp(np.sum(np.asarray(q, np.float64) * np.asarray(k, np.float64), -1))
    stderr = est.std(0, ddof=1) / np.sqrt(draws)
    assert np.all(np.abs(est.mean(0) - truth) <= 5 * stderr + 1e-6), (est.mean(0), truth, stderr)
    assert np.all(stderr < 0.05 * truth)  # and the bound is informative


def test_favor_plus_stabilized_differs_by_a_positive_per_vector_factor():
    r = feature_maps.draw_favor_projection(jax.random.key(3), 8, 16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)) * 2, jnp.float32)
    exact = feature_maps.favor_plus(x, r)
    stable = feature_maps.favor_plus(x, r, stabilize=True)
    np.testing.assert_allclose(
        feature_maps.sum_norm(stable), feature_maps.sum_norm(exact), rtol=1e-4, atol=1e-7
    )
    assert jnp.all(jnp.max(stable, -1) == pytest.approx(1 / np.sqrt(32)))


def test_favor_plus_cannot_overflow():
    r = feature_maps.draw_favor_projection(jax.random.key(4), 64, 256)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(100, 64)) * 50, jnp.float32)
    assert jnp.all(jnp.isfinite(feature_maps.favor_plus(x, r)))
    assert jnp.all(jnp.isfinite(feature_maps.favor_plus(x, r, stabilize=True)))


def test_sum_norm_and_its_guard():
    x = jnp.asarray([[1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(feature_maps.sum_norm(x), [[0.25, 0.75], [0.0, 0.0]])
    g = jax.grad(lambda x: jnp.sum(feature_maps.sum_norm(x) ** 2))(x)
    assert jnp.all(jnp.isfinite(g))


def test_l2_norm():
    x = jnp.asarray([[3.0, 4.0]], jnp.bfloat16)
    y = feature_maps.l2_norm(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), [[0.6, 0.8]], rtol=1e-2)


def test_centered_l2_norm():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0.0, 2.0, size=(5, 7)), jnp.float32)
    y = feature_maps.centered_l2_norm(x)
    np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
    # invariant to a positive scale and a shift; the positive orthant's common direction is gone
    np.testing.assert_allclose(feature_maps.centered_l2_norm(3.0 * x + 1.5), y, atol=1e-5)
    cos_raw = feature_maps.l2_norm(x) @ feature_maps.l2_norm(x).T
    assert float(jnp.min(cos_raw)) > 0.5 and float(jnp.min(y @ y.T)) < 0.0
    g = jax.grad(lambda x: jnp.sum(feature_maps.centered_l2_norm(x)[:, 0]))(x)
    assert jnp.all(jnp.isfinite(g))
    assert feature_maps.centered_l2_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_feature_map_config_validation_and_dims():
    assert FeatureMap(FeatureMapKind.DPFP, nu=3).output_dim(64) == 384
    assert FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=16).output_dim(64) == 32
    assert FeatureMap("elu_p1").output_dim(64) == 64
    with pytest.raises(ValueError, match="nu"):
        FeatureMap(FeatureMapKind.ELU_P1, nu=2)
    with pytest.raises(ValueError, match="num_features"):
        FeatureMap(FeatureMapKind.FAVOR_PLUS)
    with pytest.raises(ValueError, match="projection"):
        FeatureMap(FeatureMapKind.FAVOR_PLUS, num_features=4)(jnp.ones((2, 3)))
    with pytest.raises(ValueError):
        FeatureMap("softmax")
    hash(FeatureMap(FeatureMapKind.DPFP, nu=2))  # usable as a static jit argument
