"""Bad inputs fail early with errors that name the offending values."""

import jax.numpy as jnp
import pytest

from fwjax.ops import Impl, delta_rule, sum_rule
from fwjax.ops.linalg import unit_lower_triangular_inverse
from fwjax.ops.pallas import PallasOptions

Q = jnp.ones((2, 5, 3, 4))
V = jnp.ones((2, 5, 3, 6))
BETA = jnp.ones((2, 5, 3))


def test_shape_errors_name_the_values():
    with pytest.raises(ValueError, match=r"q and k must have the same shape"):
        delta_rule(Q, jnp.ones((2, 5, 3, 7)), V, BETA)
    with pytest.raises(ValueError, match=r"beta.shape=\(2, 5\)"):
        delta_rule(Q, Q, V, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"initial_state"):
        sum_rule(Q, Q, V, jnp.ones((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"v must match k"):
        sum_rule(Q, Q, jnp.ones((2, 4, 3, 6)))
    with pytest.raises(ValueError, match=r"q.shape=\(5, 3, 4\)"):
        sum_rule(Q[0], Q, V)
    with pytest.raises(TypeError, match="floating"):
        sum_rule(Q.astype(jnp.int32), Q, V)


def test_chunk_size_and_impl_validation():
    with pytest.raises(ValueError, match="chunk_size=0"):
        sum_rule(Q, Q, V, impl=Impl.CHUNKED, chunk_size=0)
    valid = r"\['auto', 'reference', 'recurrent', 'chunked', 'pallas'\]"
    for op in (sum_rule, lambda q, k, v, impl: delta_rule(q, k, v, BETA, impl=impl)):
        with pytest.raises(ValueError, match=rf"impl='fastest' is not one of {valid}"):
            op(Q, Q, V, impl="fastest")
    with pytest.raises(ValueError, match="value_block=0"):
        PallasOptions(value_block=0)
    with pytest.raises(ValueError, match="value_block=8 must be a power of two"):
        delta_rule(Q, Q, V, BETA, impl=Impl.PALLAS, pallas=PallasOptions(value_block=8))
    with pytest.raises(ValueError, match="value_block=64 must divide"):
        sum_rule(Q, Q, V, impl=Impl.PALLAS, pallas=PallasOptions(value_block=64))


def test_triangular_inverse_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        unit_lower_triangular_inverse(jnp.ones((3, 4)))


def test_the_chunking_module_is_a_deprecated_alias_of_common():
    import importlib
    import sys

    from fwjax.ops import common

    sys.modules.pop("fwjax.ops.chunking", None)
    with pytest.warns(DeprecationWarning, match="fwjax.ops.common"):
        chunking = importlib.import_module("fwjax.ops.chunking")
    assert chunking.to_chunks is common.to_chunks
