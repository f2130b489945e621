"""The public ops' jaxtyping annotations (:mod:`fwjax.shapes`) under a runtime type checker.

Each op runs inside ``jaxtyping.jaxtyped`` (one dimension memo per call, so ``B, T, H, K, V``
must agree across arguments and results) with typeguard checking every annotated argument and
the result. Consistent shapes pass; a wrong shape is rejected by the annotations
(``jaxtyping.TypeCheckError``) before the op's own validation runs.
"""

import functools
import inspect
import typing

import jax.numpy as jnp
import numpy as np
import pytest

typeguard = pytest.importorskip("typeguard")
jaxtyping = pytest.importorskip("jaxtyping")

from fwjax.ops import (  # noqa: E402
    FastWeightState,
    FeatureMap,
    FeatureMapKind,
    Normalization,
    UpdateRule,
    delta_rule,
    fast_weight_attention,
    fast_weight_read,
    feature_maps,
    gated_delta_rule,
    memory_keys,
    softmax_attention,
    sum_rule,
)

# typeguard cannot resolve the string annotations of NamedTuple fields (FastWeightState) and
# says so; the arrays inside are checked by the ops' own annotations.
pytestmark = pytest.mark.filterwarnings("ignore::typeguard.TypeHintWarning")

B, T, H, K, V, D, M = 2, 5, 3, 4, 6, 4, 3


def _typeguard(fn):
    """``typeguard.check_type`` on every annotated argument and on the result. (typeguard's
    own ``@typechecked`` re-reads the function's source, which a ``jax.jit`` decorator above
    the ``def`` hides from it.)"""
    hints = typing.get_type_hints(fn)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if name in hints:
                typeguard.check_type(value, hints[name])
        result = fn(*args, **kwargs)
        if "return" in hints:
            typeguard.check_type(result, hints["return"])
        return result

    return wrapper


def checked(op):
    """``op`` (its Python function, for a jitted op) with jaxtyping's shape checks."""
    return jaxtyping.jaxtyped(typechecker=_typeguard)(getattr(op, "__wrapped__", op))


def _inputs():
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    gate = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), jnp.float32)
    return {
        "q": normal(B, T, H, K),
        "k": normal(B, T, H, K),
        "v": normal(B, T, H, V),
        "beta": gate,
        "alpha": gate,
        "s0": normal(B, H, K, V),
    }


def test_the_rules_pass_with_consistent_shapes():
    x = _inputs()
    out, state = checked(delta_rule)(x["q"], x["k"], x["v"], x["beta"], x["s0"], impl="recurrent")
    assert out.shape == (B, T, H, V) and state.shape == (B, H, K, V)
    out, _ = checked(sum_rule)(x["q"], x["k"], x["v"], None, None, impl="chunked", chunk_size=2)
    assert out.shape == (B, T, H, V)
    args = (x["q"], x["k"], x["v"], x["beta"], x["alpha"], x["s0"])
    out, _ = checked(gated_delta_rule)(*args, impl="recurrent", remat_block=2)
    assert out.shape == (B, T, H, V)


def test_attention_and_feature_maps_pass_with_consistent_shapes():
    x = _inputs()
    y, state = checked(fast_weight_attention)(
        x["q"], x["k"], x["v"], x["beta"], normalization=Normalization.ATTENTION
    )
    assert y.shape == (B, T, H, V) and state.normalizer.shape == (B, H, K)
    y, _ = checked(fast_weight_attention)(x["q"], x["k"], x["v"], update_rule=UpdateRule.SUM)
    dpfp = FeatureMap(FeatureMapKind.DPFP, nu=2)
    keys = checked(memory_keys)(x["k"], dpfp, Normalization.SUM)
    assert keys.shape == (B, T, H, 2 * 2 * D)
    s = FastWeightState(jnp.zeros((B, H, keys.shape[-1], V)), None)
    assert checked(fast_weight_read)(x["q"], s, feature_map=dpfp).shape == (B, T, H, V)
    assert checked(softmax_attention)(x["q"][:, :2], x["k"], x["v"]).shape == (B, 2, H, V)
    projection = jnp.ones((D, M))
    assert checked(feature_maps.favor_plus)(x["q"], projection).shape == (B, T, H, 2 * M)
    for fm in (feature_maps.elu_p1, feature_maps.sum_norm, feature_maps.l2_norm):
        assert checked(fm)(x["q"]).shape == x["q"].shape
    assert checked(feature_maps.centered_l2_norm)(x["q"]).shape == x["q"].shape
    assert checked(feature_maps.dpfp)(x["q"], 2).shape == (B, T, H, 2 * 2 * D)


WRONG = {
    "delta_rule beta [B, T-1, H]": lambda x: checked(delta_rule)(
        x["q"], x["k"], x["v"], x["beta"][:, 1:]
    ),
    "delta_rule v [1, T, H, V]": lambda x: checked(delta_rule)(
        x["q"], x["k"], x["v"][:1], x["beta"]
    ),
    "sum_rule state [B, H, K-1, V]": lambda x: checked(sum_rule)(
        x["q"], x["k"], x["v"], x["s0"][:, :, 1:]
    ),
    "sum_rule integer q": lambda x: checked(sum_rule)(
        x["q"].astype(jnp.int32), x["k"], x["v"]
    ),
    "gated_delta_rule alpha [B, T, H-1]": lambda x: checked(gated_delta_rule)(
        x["q"], x["k"], x["v"], x["beta"], x["alpha"][..., 1:]
    ),
    "fast_weight_attention k [B, T, H-1, D]": lambda x: checked(fast_weight_attention)(
        x["q"], x["k"][:, :, 1:], x["v"], x["beta"]
    ),
    "softmax_attention v [B, S+1, H, V]": lambda x: checked(softmax_attention)(
        x["q"], x["k"], jnp.concatenate([x["v"], x["v"][:, :1]], axis=1)
    ),
    "favor_plus projection [D+1, M]": lambda x: checked(feature_maps.favor_plus)(
        x["q"], jnp.ones((D + 1, M))
    ),
}


@pytest.mark.parametrize("call", WRONG.values(), ids=WRONG.keys())
def test_a_wrong_shape_is_rejected_by_the_annotations(call):
    with pytest.raises(jaxtyping.TypeCheckError):
        call(_inputs())
