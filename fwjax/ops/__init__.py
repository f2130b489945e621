"""Pure JAX fast weight ops. Imports neither Flax nor configuration libraries.

Public entry points dispatch on :class:`Impl`::

    from fwjax.ops import Impl, delta_rule, sum_rule, softmax_attention, feature_maps
    out, state = delta_rule(q, k, v, beta, initial_state=None, scale=1.0, impl=Impl.AUTO)
"""

from fwjax.ops import feature_maps, segments
from fwjax.ops.delta_product import delta_product, delta_product_step
from fwjax.ops.delta_rnn import delta_lstm, delta_lstm_step, delta_rnn, delta_rnn_step
from fwjax.ops.delta_rule import delta_rule, delta_rule_step
from fwjax.ops.fast_weight_attention import (
    FastWeightState,
    Normalization,
    UpdateRule,
    fast_weight_attention,
    fast_weight_read,
    init_fast_weight_state,
    memory_keys,
)
from fwjax.ops.feature_maps import FeatureMap, FeatureMapKind
from fwjax.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from fwjax.ops.impl import Impl
from fwjax.ops.readout import retrieval_readout
from fwjax.ops.recurrent_delta import recurrent_delta_rule, recurrent_delta_step
from fwjax.ops.softmax_attention import softmax_attention
from fwjax.ops.srwm import srwm, srwm_step
from fwjax.ops.sum_rule import sum_rule, sum_rule_step

__all__ = [
    "FastWeightState",
    "FeatureMap",
    "FeatureMapKind",
    "Impl",
    "Normalization",
    "UpdateRule",
    "delta_lstm",
    "delta_lstm_step",
    "delta_product",
    "delta_product_step",
    "delta_rnn",
    "delta_rnn_step",
    "delta_rule",
    "delta_rule_step",
    "fast_weight_attention",
    "fast_weight_read",
    "feature_maps",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "init_fast_weight_state",
    "memory_keys",
    "recurrent_delta_rule",
    "recurrent_delta_step",
    "retrieval_readout",
    "segments",
    "softmax_attention",
    "srwm",
    "srwm_step",
    "sum_rule",
    "sum_rule_step",
]
