import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops.linalg import unit_lower_triangular_inverse
from tests.tolerances import assert_close


@pytest.mark.parametrize("n", [1, 9, 24, pytest.param(100, marks=pytest.mark.slow)])
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_inverse_of_unit_lower_triangular(n, block_size):
    rng = np.random.default_rng(n)
    a = np.tril(rng.normal(size=(2, 3, n, n)) * 0.3, -1).astype(np.float32)
    x = unit_lower_triangular_inverse(jnp.asarray(a), block_size=block_size)
    expected = np.linalg.inv(np.eye(n) + a.astype(np.float64))
    assert_close(x, expected)
    assert np.all(np.triu(np.asarray(x), 1) == 0)


def test_inverse_gradient_is_the_matrix_identity():
    """d(L⁻¹) = −L⁻¹ dL L⁻¹: the autodiff gradient agrees with the closed form on the strictly
    lower part."""
    rng = np.random.default_rng(0)
    n = 20
    a = jnp.asarray(np.tril(rng.normal(size=(n, n)) * 0.3, -1), jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
    grad = jax.grad(lambda a: jnp.sum(unit_lower_triangular_inverse(a) * g))(a)
    x = np.linalg.inv(np.eye(n) + np.asarray(a, np.float64))
    expected = np.tril(-(x.T @ np.asarray(g) @ x.T), -1)
    # Only the strictly lower part is read, so the rest of the gradient is exactly zero.
    np.testing.assert_array_equal(np.triu(np.asarray(grad)), 0.0)
    # float32 gradient vs the float64 closed form; entries are O(1-10), so 1e-4 is ~1e-5 relative.
    np.testing.assert_allclose(grad, expected, atol=1e-4)
