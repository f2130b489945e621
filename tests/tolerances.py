"""The one dtype-keyed tolerance table of the test suite.

Keyed by the dtype of the array being compared: outputs and input gradients carry the inputs'
dtype, final states carry the state dtype (at least float32). Comparisons use
``|actual − expected| <= atol · max(1, max|expected|) + rtol · |expected|``.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES = {
    jnp.dtype(jnp.float64): Tolerance(atol=1e-10, rtol=1e-10),
    jnp.dtype(jnp.float32): Tolerance(atol=5e-5, rtol=5e-5),
    # bfloat16 has an 8-bit mantissa: one rounding is a relative error of up to 2^-8.
    jnp.dtype(jnp.bfloat16): Tolerance(atol=2e-2, rtol=2e-2),
}


def assert_close(actual, expected, dtype=None, err_msg=""):
    """Asserts ``actual ≈ expected`` with the tolerance of ``dtype`` (default: ``actual``'s)."""
    dtype = jnp.dtype(dtype if dtype is not None else actual.dtype)
    tol = TOLERANCES[dtype]
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        actual, expected, atol=tol.atol * scale, rtol=tol.rtol, err_msg=err_msg
    )
