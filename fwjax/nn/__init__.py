"""Flax NNX layers and models built on :mod:`fwjax.ops`."""

from fwjax.nn.attention import (
    FastWeightAttention,
    FastWeightLayerState,
    FavorProjection,
    KVCache,
    SoftmaxAttention,
    causal_depthwise_conv,
)
from fwjax.nn.config import (
    AttentionKind,
    FastWeightConfig,
    FavorRedraw,
    ModelConfig,
    NormPosition,
)
from fwjax.nn.retrieval import RetrievalConfig, RetrievalModel
from fwjax.nn.transformer import (
    FeedForward,
    LMState,
    TransformerBlock,
    TransformerLM,
    generate,
    redraw_favor_projections,
    sample_logits,
    sinusoidal_positions,
)

__all__ = [
    "AttentionKind",
    "FastWeightAttention",
    "FastWeightConfig",
    "FastWeightLayerState",
    "FavorProjection",
    "FavorRedraw",
    "FeedForward",
    "KVCache",
    "LMState",
    "ModelConfig",
    "NormPosition",
    "RetrievalConfig",
    "RetrievalModel",
    "SoftmaxAttention",
    "TransformerBlock",
    "TransformerLM",
    "causal_depthwise_conv",
    "generate",
    "redraw_favor_projections",
    "sample_logits",
    "sinusoidal_positions",
]
