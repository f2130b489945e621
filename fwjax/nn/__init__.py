"""Flax NNX layers and models built on :mod:`fwjax.ops`."""

from fwjax.nn.attention import (
    BaseConv,
    FastWeightAttention,
    FastWeightLayerState,
    FavorProjection,
    KVCache,
    SoftmaxAttention,
    causal_depthwise_conv,
    rotary_embedding,
)
from fwjax.nn.config import (
    PAPER_RECIPE,
    Activation,
    AttentionKind,
    FastWeightConfig,
    FavorRedraw,
    ModelConfig,
    NormPosition,
    Positional,
    Remat,
)
from fwjax.nn.partitioning import AXIS_NAMES, logical_axis_rules
from fwjax.nn.recurrent_fwp import (
    RecurrentDeltaAttention,
    RecurrentDeltaLayerState,
    SRWMAttention,
    SRWMLayerState,
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
    "AXIS_NAMES",
    "PAPER_RECIPE",
    "Activation",
    "AttentionKind",
    "BaseConv",
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
    "Positional",
    "RecurrentDeltaAttention",
    "RecurrentDeltaLayerState",
    "Remat",
    "RetrievalConfig",
    "RetrievalModel",
    "SRWMAttention",
    "SRWMLayerState",
    "SoftmaxAttention",
    "TransformerBlock",
    "TransformerLM",
    "causal_depthwise_conv",
    "generate",
    "logical_axis_rules",
    "redraw_favor_projections",
    "rotary_embedding",
    "sample_logits",
    "sinusoidal_positions",
]
