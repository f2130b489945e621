"""Typed, validated configuration of the fwjax layers and models (frozen dataclasses + enums).

Configs are converted once from whatever a user or config file gives (strings are accepted for
enums and coerced in ``__post_init__``) and are hashable, so modules can be rebuilt from them.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping

import jax.numpy as jnp

from fwjax.ops import FeatureMap, FeatureMapKind, Impl, Normalization, UpdateRule
from fwjax.ops.pallas import PallasOptions
from fwjax.validation import check_positive_ints as _positive


class AttentionKind(enum.Enum):
    """The token mixer of a layer.

    Attributes:
      FAST_WEIGHT: :class:`~fwjax.nn.FastWeightAttention` (``ModelConfig.fast_weight``).
      SOFTMAX: :class:`~fwjax.nn.SoftmaxAttention`.
      RECURRENT_DELTA: the Recurrent Delta Net
        (:class:`~fwjax.nn.recurrent_fwp.RecurrentDeltaAttention`; ``fast_weight.impl``).
      SRWM: the modern self-referential weight matrix
        (:class:`~fwjax.nn.recurrent_fwp.SRWMAttention`; ``fast_weight.impl``).
      DELTA_RNN, DELTA_LSTM: the Delta RNN and Delta LSTM (recurrent fast weights fed back the
        previous output; :class:`~fwjax.nn.recurrent_fwp.DeltaRNNAttention`,
        :class:`~fwjax.nn.recurrent_fwp.DeltaLSTMAttention`; ``fast_weight.impl``,
        ``chunk_size`` and ``pallas`` run their feed-forward Delta Nets).
      BASE_CONV: Zoology's gated short convolution (:class:`~fwjax.nn.BaseConv`), the layer
        that precedes every sequence mixer in the Zoology recall models.
    """

    FAST_WEIGHT = "fast_weight"
    SOFTMAX = "softmax"
    RECURRENT_DELTA = "recurrent_delta"
    SRWM = "srwm"
    DELTA_RNN = "delta_rnn"
    DELTA_LSTM = "delta_lstm"
    BASE_CONV = "base_conv"


class Remat(enum.Enum):
    """What a Transformer block keeps for its backward pass (rematerialisation,
    ``jax.checkpoint``); the rest is recomputed in the backward pass.

    Attributes:
      NONE: everything the backward pass needs (fastest, most memory).
      FULL: only the block's input: the whole block is recomputed.
      DOTS: the results of matrix products without batch dimensions (the projections and the
        feed-forward; ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).
      FAST_WEIGHT: the fast weight op's own residuals (its inputs and per-chunk states, kept by
        its ``custom_vjp``) and the block's input; the projections, normalisations and the
        feed-forward around the op are recomputed, the op is never run twice. Softmax blocks
        fall back to FULL.
    """

    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    FAST_WEIGHT = "fast_weight"


class NormPosition(enum.Enum):
    """Where a Transformer block normalises: after the residual (the paper) or before."""

    POST = "post"
    PRE = "pre"


class Positional(enum.Enum):
    """How a language model knows where a token is.

    Attributes:
      NONE: no positions (fast weight models that carry their memory across segments).
      SINUSOIDAL: fixed sinusoidal encodings added to the embeddings (Vaswani et al., 2017).
      LEARNED: a trained table of ``max_len`` position embeddings added to the token embeddings
        (GPT-2); positions must stay below ``max_len``.
      ROTARY: rotary embeddings of queries and keys in softmax attention layers (Su et al.,
        2021); fast weight layers see no positions.
    """

    NONE = "none"
    SINUSOIDAL = "sinusoidal"
    LEARNED = "learned"
    ROTARY = "rotary"

    @classmethod
    def _missing_(cls, value):
        # Booleans of the earlier API: True meant sinusoidal positions, False none.
        if isinstance(value, bool):
            return cls.SINUSOIDAL if value else cls.NONE
        return None


class Activation(enum.Enum):
    """The feed-forward nonlinearity: ReLU (Transformer-XL, the paper) or GELU (GPT-2)."""

    RELU = "relu"
    GELU = "gelu"


class FavorRedraw(enum.Enum):
    """When FAVOR+'s random projection is redrawn.

    Attributes:
      NEVER: drawn once at initialisation (deterministic evaluation).
      PER_STEP: the training loop calls ``redraw_favor_projections`` before every step (the
        official LM code's training behaviour); evaluation uses the last draw.
    """

    NEVER = "never"
    PER_STEP = "per_step"


_ELU_P1 = FeatureMap(FeatureMapKind.ELU_P1)


@dataclasses.dataclass(frozen=True)
class FastWeightConfig:
    """A fast weight attention layer (Schlag et al., 2021), with optional DeltaNet (2024) extras.

    Attributes:
      feature_map: φ applied to keys and queries (``FeatureMap``: ELU+1, DPFP-ν, FAVOR+(m)).
      normalization: key/query and output normalisation.
      update_rule: sum or delta rule.
      beta_range: the write strength is ``β = beta_range · σ(w_β·x)``: 1 (the paper) keeps
        ``I − β k kᵀ`` positive semi-definite for unit keys; 2 lets it reach eigenvalue −1, a
        reflection (Grazzi et al., 2025, "Unlocking State-Tracking in Linear RNNs Through
        Negative Eigenvalues"; flash-linear-attention's ``allow_neg_eigval``). In ``(0, 2]``.
      householder_steps: ``N`` delta steps per token (DeltaProduct, Siems et al., 2025;
        :func:`fwjax.ops.delta_product`): the layer projects ``N`` keys, values and write
        strengths per head and token. 1 is the delta rule; above 1 it needs the DELTA rule
        without attention normalisation (and no memory diagnostics).
      favor_redraw: redraw policy of FAVOR+'s projection.
      short_conv: a causal depthwise convolution of ``conv_size`` on q, k, v (DeltaNet).
      conv_size: its kernel length.
      silu_l2_qk: SiLU then L2 normalisation of q and k before φ (DeltaNet without short
        convolutions; use with ``FeatureMap(IDENTITY)`` and ``Normalization.NONE``). With
        ``short_conv``, whose SiLU comes first, q and k pass SiLU twice; fla's DeltaNet with
        short convolutions is ``short_conv`` with ``Normalization.L2`` instead
        (:mod:`fwjax.interop.fla`).
      output_norm: per-head RMSNorm of the attention output (DeltaNet).
      output_gate: multiply the normalised output by ``SiLU(W_g x)``, a bias-free projection
        of the layer input (fla DeltaNet's ``use_gate``); needs ``output_norm``.
      norm_eps: the output RMSNorm's epsilon (flax's default 1e-6; fla's DeltaNet uses 1e-5).
      impl: how the op is computed; ``chunk_size``: the chunk length of the chunkwise forms
        (CHUNKED, PALLAS); ``pallas``: the :class:`~fwjax.ops.pallas.PallasOptions` of PALLAS
        (a mapping of its fields is accepted), None for the defaults; ``state_segments``: the
        (gated) delta rule's CHUNKED (and phased PALLAS) chunk scans as that many parallel
        segments (:func:`fwjax.ops.delta_rule`), None for one sequential scan.
      diagnostics: also record memory diagnostics (:mod:`fwjax.diagnostics`: state norm,
        retrieval error and cosine, β statistics, effective rank; one extra O(T·K·V) scan) as
        ``nnx.Intermediate`` values named ``memory`` when the call runs under
        ``nnx.capture(..., nnx.Intermediate)``, as in the training loop, which logs them.
    """

    feature_map: FeatureMap = _ELU_P1
    normalization: Normalization = Normalization.SUM
    update_rule: UpdateRule = UpdateRule.DELTA
    beta_range: float = 1.0
    householder_steps: int = 1
    favor_redraw: FavorRedraw = FavorRedraw.NEVER
    short_conv: bool = False
    conv_size: int = 4
    silu_l2_qk: bool = False
    output_norm: bool = False
    output_gate: bool = False
    norm_eps: float = 1e-6
    impl: Impl = Impl.AUTO
    chunk_size: int | None = None
    diagnostics: bool = False
    pallas: PallasOptions | None = None
    state_segments: int | None = None

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
        if not 0.0 < self.beta_range <= 2.0:
            raise ValueError(
                f"beta_range={self.beta_range} must be in (0, 2]: above 2, I − β k kᵀ has "
                "eigenvalues below −1 and the memory can grow without bound"
            )
        _positive(householder_steps=self.householder_steps)
        if self.householder_steps > 1 and (
            self.update_rule is not UpdateRule.DELTA or self.normalization.uses_normalizer
        ):
            raise ValueError(
                f"householder_steps={self.householder_steps} needs update_rule=DELTA without "
                f"attention normalisation; got {self.update_rule=}, {self.normalization=}"
            )
        if self.householder_steps > 1 and self.diagnostics:
            raise ValueError(
                "memory diagnostics of DeltaProduct (householder_steps > 1) are not built"
            )
        if self.output_gate and not self.output_norm:
            raise ValueError(f"output_gate={self.output_gate} needs output_norm=True")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")
        _positive(chunk_size=self.chunk_size, allow_none=True)
        _positive(state_segments=self.state_segments, allow_none=True)
        if isinstance(self.pallas, Mapping):
            object.__setattr__(self, "pallas", PallasOptions(**self.pallas))
        if not isinstance(self.pallas, PallasOptions | None):
            raise TypeError(f"pallas={self.pallas!r} must be a PallasOptions, a mapping or None")


_DEFAULT_FAST_WEIGHT = FastWeightConfig()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Transformer language model whose layers each use fast weight or softmax attention.

    Attributes:
      vocab_size, d_model, num_layers, num_heads, d_ff: sizes (``d_ff = 0``: blocks without a
        feed-forward sublayer, Zoology's recall models); ``num_heads`` must divide
        ``d_model`` (head dimension ``d_model // num_heads``).
      layer_kinds: one ``AttentionKind`` per layer (hybrids allowed); None means all FAST_WEIGHT.
      fast_weight: the fast weight layers' configuration.
      norm_position: PRE (GPT-2; a final LayerNorm before the output) or POST (the paper).
      positional: :class:`Positional`: LEARNED, SINUSOIDAL, ROTARY (softmax layers) or NONE
        (models that carry their memory across segments). ``True``/``False`` still mean
        SINUSOIDAL/NONE.
      tie_embeddings: share the input embedding with the output projection.
      dropout: residual/feed-forward dropout rate.
      max_len: the KV-cache length of softmax layers when decoding, and the size of the
        LEARNED position table.
      embed_init_std: the token (and learned position) embeddings are drawn from
        N(0, embed_init_std²): 0.02 as GPT-2; the paper's Transformer-XL recipe uses 1.0 with
        ``embed_scale``.
      embed_scale: multiply token embeddings by √d_model (Vaswani et al.; the paper's recipe).
      activation: the feed-forward nonlinearity, :class:`Activation` (GELU or RELU).
      scale_residual_init: scale the initial weights of the projections that write into the
        residual stream (attention output, feed-forward down) by 1/√(2·num_layers), as GPT-2.
      dtype: compute dtype (e.g. bfloat16); the fast weight state is always float32.
      param_dtype: the dtype parameters are stored in; float32 unless set. Below float32
        (e.g. bfloat16) the training optimizer keeps float32 master weights
        (:func:`fwjax.train.optim.with_master_weights`).
      scan_layers: store the blocks as one module whose variables have a leading layer axis
        (built with ``nnx.vmap``, as MaxText and the flax gemma example) and run them as one
        ``lax.scan``: the block is traced and compiled once, the optimizer updates a few
        stacked arrays. Needs one attention kind for all layers and no FAVOR+ (its per-layer
        redraws); parameters and checkpoints are laid out stacked.
      remat: :class:`Remat`, what each block keeps for the backward pass.

    The defaults are the GPT-2 / nanoGPT recipe of small language models; the paper's
    Transformer-XL-style recipe is :data:`PAPER_RECIPE` (``ModelConfig(**PAPER_RECIPE, ...)``).
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 512
    layer_kinds: tuple[AttentionKind, ...] | None = None
    fast_weight: FastWeightConfig = _DEFAULT_FAST_WEIGHT
    norm_position: NormPosition = NormPosition.PRE
    positional: Positional = Positional.LEARNED
    tie_embeddings: bool = False
    dropout: float = 0.0
    max_len: int = 2048
    embed_init_std: float = 0.02
    embed_scale: bool = False
    activation: Activation = Activation.GELU
    scale_residual_init: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: Remat = Remat.NONE

    def __post_init__(self):
        _positive(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            max_len=self.max_len,
        )
        if self.d_ff < 0 or isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int):
            raise ValueError(f"d_ff={self.d_ff!r} must be an int >= 0 (0: no feed-forward)")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        kinds = self.layer_kinds
        kinds = (AttentionKind.FAST_WEIGHT,) * self.num_layers if kinds is None else kinds
        kinds = tuple(AttentionKind(k) for k in kinds)
        if len(kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(kinds)} entries; num_layers={self.num_layers}")
        object.__setattr__(self, "layer_kinds", kinds)
        object.__setattr__(self, "norm_position", NormPosition(self.norm_position))
        object.__setattr__(self, "positional", Positional(self.positional))
        object.__setattr__(self, "activation", Activation(self.activation))
        object.__setattr__(self, "remat", Remat(self.remat))
        if self.scan_layers and len(set(kinds)) > 1:
            raise ValueError(f"scan_layers=True needs one attention kind; got layer_kinds={kinds}")
        if self.scan_layers and self.fast_weight.feature_map.needs_projection:
            raise ValueError("scan_layers=True does not support FAVOR+ (per-layer redraws)")
        if self.scan_layers and self.fast_weight.diagnostics:
            raise ValueError(
                "scan_layers=True cannot record fast_weight.diagnostics (recorded per layer)"
            )
        if not self.embed_init_std > 0:
            raise ValueError(f"embed_init_std={self.embed_init_std} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(f"{name}={value!r} must name a floating-point dtype")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


# The paper's Transformer-XL-style recipe (Schlag et al., 2021; Dai et al., 2019): post-LN,
# ReLU feed-forward, sinusoidal positions, N(0, 1) embeddings scaled by √d_model, LeCun-normal
# projections without residual scaling, dropout 0.1.
PAPER_RECIPE = types.MappingProxyType(
    dict(
        norm_position=NormPosition.POST,
        positional=Positional.SINUSOIDAL,
        embed_init_std=1.0,
        embed_scale=True,
        activation=Activation.RELU,
        scale_residual_init=False,
        dropout=0.1,
    )
)
