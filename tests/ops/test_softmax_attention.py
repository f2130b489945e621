import jax.numpy as jnp
import numpy as np
import pytest

from fwjax.ops import softmax_attention
from tests.oracle import softmax_attention_np
from tests.tolerances import assert_close


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("t", "s"), [(1, 1), (7, 7), (3, 9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_softmax_attention_matches_naive(causal, t, s, dtype):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, 3, 8)), dtype)
    k = jnp.asarray(rng.normal(size=(2, s, 3, 8)), dtype)
    v = jnp.asarray(rng.normal(size=(2, s, 3, 5)), dtype)
    out = softmax_attention(q, k, v, causal=causal)
    assert out.dtype == jnp.dtype(dtype)
    expected = softmax_attention_np(
        np.asarray(q, np.float64),
        np.asarray(k, np.float64),
        np.asarray(v, np.float64),
        causal,
        1 / np.sqrt(8),
    )
    assert_close(out, expected)


def test_softmax_attention_is_stable_for_large_logits():
    q = jnp.full((1, 4, 1, 2), 1e3)
    out = softmax_attention(q, q, jnp.ones((1, 4, 1, 3)), scale=1.0)
    assert jnp.all(jnp.isfinite(out))


def test_softmax_attention_validates():
    with pytest.raises(ValueError, match="at least as many keys"):
        softmax_attention(jnp.ones((1, 4, 1, 2)), jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)))
