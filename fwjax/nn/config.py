"""Typed, validated configuration of the fwjax layers and models (frozen dataclasses + enums).

Configs are converted once from whatever a user or config file gives (strings are accepted for
enums and coerced in ``__post_init__``) and are hashable, so modules can be rebuilt from them.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp

from fwjax.ops import FeatureMap, FeatureMapKind, Impl, Normalization, UpdateRule


class AttentionKind(enum.Enum):
    """The token mixer of a layer."""

    FAST_WEIGHT = "fast_weight"
    SOFTMAX = "softmax"


class NormPosition(enum.Enum):
    """Where a Transformer block normalises: after the residual (the paper) or before."""

    POST = "post"
    PRE = "pre"


class FavorRedraw(enum.Enum):
    """When FAVOR+'s random projection is redrawn.

    Attributes:
      NEVER: drawn once at initialisation (deterministic evaluation).
      PER_STEP: the training loop calls ``redraw_favor_projections`` before every step (the
        official LM code's training behaviour); evaluation uses the last draw.
    """

    NEVER = "never"
    PER_STEP = "per_step"


def _positive(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


_ELU_P1 = FeatureMap(FeatureMapKind.ELU_P1)


@dataclasses.dataclass(frozen=True)
class FastWeightConfig:
    """A fast weight attention layer (Schlag et al., 2021), with optional DeltaNet (2024) extras.

    Attributes:
      feature_map: φ applied to keys and queries (``FeatureMap``: ELU+1, DPFP-ν, FAVOR+(m)).
      normalization: key/query and output normalisation.
      update_rule: sum or delta rule.
      favor_redraw: redraw policy of FAVOR+'s projection.
      short_conv: a causal depthwise convolution of ``conv_size`` on q, k, v (DeltaNet).
      conv_size: its kernel length.
      silu_l2_qk: SiLU then L2 normalisation of q and k before φ (DeltaNet; use with
        ``FeatureMap(IDENTITY)`` and ``Normalization.NONE`` for the 2024 recipe).
      output_norm: per-head RMSNorm of the attention output (DeltaNet).
      impl: how the op is computed; ``chunk_size`` for CHUNKED.
      diagnostics: also record memory diagnostics (:mod:`fwjax.diagnostics`: state norm,
        retrieval error and cosine, β statistics, effective rank; one extra O(T·K·V) scan) as
        ``nnx.Intermediate`` values named ``memory`` when the call runs under
        ``nnx.capture(..., nnx.Intermediate)``, as in the training loop, which logs them.
    """

    feature_map: FeatureMap = _ELU_P1
    normalization: Normalization = Normalization.SUM
    update_rule: UpdateRule = UpdateRule.DELTA
    favor_redraw: FavorRedraw = FavorRedraw.NEVER
    short_conv: bool = False
    conv_size: int = 4
    silu_l2_qk: bool = False
    output_norm: bool = False
    impl: Impl = Impl.AUTO
    chunk_size: int | None = None
    diagnostics: bool = False

    def __post_init__(self):
        for name, kind in (
            ("normalization", Normalization),
            ("update_rule", UpdateRule),
            ("favor_redraw", FavorRedraw),
            ("impl", Impl),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if not isinstance(self.feature_map, FeatureMap):
            raise TypeError(f"feature_map={self.feature_map!r} must be a FeatureMap")
        if self.update_rule is UpdateRule.GATED_DELTA and self.normalization.uses_normalizer:
            raise ValueError(
                f"update_rule=GATED_DELTA has no attention normalisation; got {self.normalization}"
            )
        _positive(conv_size=self.conv_size)
        if self.chunk_size is not None:
            _positive(chunk_size=self.chunk_size)


_DEFAULT_FAST_WEIGHT = FastWeightConfig()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Transformer language model whose layers each use fast weight or softmax attention.

    Attributes:
      vocab_size, d_model, num_layers, num_heads, d_ff: sizes; ``num_heads`` must divide
        ``d_model`` (head dimension ``d_model // num_heads``).
      layer_kinds: one ``AttentionKind`` per layer (hybrids allowed); None means all FAST_WEIGHT.
      fast_weight: the fast weight layers' configuration.
      norm_position: POST (the paper) or PRE layer normalisation.
      positional: add sinusoidal positions (off for models that carry state across segments).
      tie_embeddings: share the input embedding with the output projection.
      dropout: residual/feed-forward dropout rate.
      max_len: the KV-cache length of softmax layers when decoding.
      dtype: compute dtype (e.g. bfloat16); parameters are float32 and the fast weight state is
        always float32.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 512
    layer_kinds: tuple[AttentionKind, ...] | None = None
    fast_weight: FastWeightConfig = _DEFAULT_FAST_WEIGHT
    norm_position: NormPosition = NormPosition.POST
    positional: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    max_len: int = 2048
    dtype: str = "float32"

    def __post_init__(self):
        _positive(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            d_ff=self.d_ff,
            max_len=self.max_len,
        )
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        kinds = self.layer_kinds
        kinds = (AttentionKind.FAST_WEIGHT,) * self.num_layers if kinds is None else kinds
        kinds = tuple(AttentionKind(k) for k in kinds)
        if len(kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(kinds)} entries; num_layers={self.num_layers}")
        object.__setattr__(self, "layer_kinds", kinds)
        object.__setattr__(self, "norm_position", NormPosition(self.norm_position))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        jnp.dtype(self.dtype)  # raises TypeError for an unknown dtype name

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads
