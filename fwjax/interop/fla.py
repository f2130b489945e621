"""flash-linear-attention (fla) DeltaNet layers as :class:`~fwjax.nn.FastWeightAttention`.

fla's ``fla.layers.DeltaNet`` (Yang et al., 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length") computes, per token ``x_t`` and head:

* ``q, k = SiLU(ShortConv(W_q x)), SiLU(ShortConv(W_k x))``, ``v = SiLU(ShortConv(W_v x))``
  (causal depthwise convolutions of ``conv_size`` taps, no bias);
* ``q, k ← q/√(‖q‖² + 10⁻⁶), k/√(‖k‖² + 10⁻⁶)`` (L2), ``β_t = σ(w_β·x_t)``;
* the delta rule ``S_t = S_{t-1} + β_t (v_t − S_{t-1}ᵀ k_t) k_tᵀ``, ``o_t = S_tᵀ q_t / √d_head``;
* a per-head RMSNorm of ``o_t`` (eps ``norm_eps``), times ``SiLU(W_g x_t)`` with ``use_gate``;
* the output projection ``W_o``.

This is :class:`~fwjax.nn.FastWeightAttention` with the options of :func:`deltanet_config`:
``FeatureMap(IDENTITY)``, ``Normalization.L2``, ``UpdateRule.DELTA``, ``short_conv`` (its SiLU
is applied to q, k and v), ``output_norm`` with ``norm_eps``, and ``output_gate``. The
parameters map as follows (PyTorch ``nn.Linear`` weights are ``[out, in]``, fwjax kernels
``[in, out]``; ``d = hidden_size``, ``H`` heads, ``J = conv_size``)::

    fla state_dict name           shape         fwjax parameter      what
    q_proj.weight                 [d, d]        qkvb.kernel[:, 0:d]        = W_qᵀ
    k_proj.weight                 [d, d]        qkvb.kernel[:, d:2d]       = W_kᵀ
    v_proj.weight                 [d, d]        qkvb.kernel[:, 2d:3d]      = W_vᵀ
    b_proj.weight                 [H, d]        qkvb.kernel[:, 3d:3d+H]    = W_βᵀ
    q_conv1d.weight               [d, 1, J]     conv[:, 0:d]               = w[:, 0, :]ᵀ
    k_conv1d.weight               [d, 1, J]     conv[:, d:2d]              = w[:, 0, :]ᵀ
    v_conv1d.weight               [d, 1, J]     conv[:, 2d:3d]             = w[:, 0, :]ᵀ
    o_norm.weight                 [d/H]         norm.scale
    g_proj.weight (use_gate)      [d, d]        out_gate.kernel            = W_gᵀ
    o_proj.weight                 [d, d]        out.kernel                 = W_oᵀ

Channels are head-major in both (``(h d)``); the convolution's last tap multiplies the current
step in both (PyTorch's ``Conv1d`` is a cross-correlation). Supported: fla's defaults and
``use_gate``; refused with a ValueError naming the value: ``expand_k``/``expand_v`` ≠ 1,
``use_short_conv=False`` (fla then applies SiLU to v without a convolution), ``conv_bias``,
``use_beta=False``, ``qk_activation`` ≠ ``silu``, ``qk_norm`` ≠ ``l2``. ``allow_neg_eigval``
(fla doubles β) is ``FastWeightConfig.beta_range = 2``.

A layer inside an fla model checkpoint (e.g. ``model.layers.3.attn.q_proj.weight``) is taken
with ``prefix="model.layers.3.attn."``. Usage, with the torch layer at hand::

    sd = {k: v.detach().float().numpy() for k, v in layer.state_dict().items()}
    fw = from_fla_deltanet(sd, DeltaNetOptions.of_layer(layer))
    y, state = fw(jnp.asarray(x))       # == layer(x)[0]

Nothing here imports PyTorch or fla.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwjax.nn.attention import FastWeightAttention
from fwjax.nn.config import FastWeightConfig
from fwjax.ops import FeatureMap, FeatureMapKind, Impl, Normalization, UpdateRule


@dataclasses.dataclass(frozen=True)
class DeltaNetOptions:
    """fla DeltaNet hyperparameters that its ``state_dict`` does not show (fla's defaults).

    Attributes:
      qk_activation: fla's ``qk_activation``; only ``"silu"`` is supported.
      qk_norm: fla's ``qk_norm``; only ``"l2"`` is supported.
      allow_neg_eigval: fla's ``allow_neg_eigval``: β = 2σ(·) ∈ (0, 2), fwjax's
        ``beta_range = 2``.
      norm_eps: the output RMSNorm's epsilon (fla's ``norm_eps``).
    """

    qk_activation: str = "silu"
    qk_norm: str = "l2"
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.qk_activation != "silu":
            raise ValueError(f"qk_activation={self.qk_activation!r}: only 'silu' is supported")
        if self.qk_norm != "l2":
            raise ValueError(f"qk_norm={self.qk_norm!r}: only 'l2' is supported")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")

    @classmethod
    def of_layer(cls, layer) -> DeltaNetOptions:
        """The options of an ``fla.layers.DeltaNet`` instance (read by attribute name)."""
        return cls(
            qk_activation=layer.qk_activation,
            qk_norm=layer.qk_norm,
            allow_neg_eigval=layer.allow_neg_eigval,
            norm_eps=float(layer.o_norm.eps),
        )


@dataclasses.dataclass(frozen=True)
class DeltaNetShape:
    """What an fla DeltaNet ``state_dict`` shows about its layer.

    Attributes:
      hidden_size: ``d`` (= key and value width; fwjax's ``d_model``).
      num_heads: ``H``.
      conv_size: the short convolutions' taps ``J``.
      use_gate: whether the output is gated (``g_proj``).
    """

    hidden_size: int
    num_heads: int
    conv_size: int
    use_gate: bool


def _layer_weights(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    out = {
        k[len(prefix) :]: np.asarray(v, np.float32)
        for k, v in state_dict.items()
        if k.startswith(prefix)
    }
    if not out:
        raise ValueError(f"no weights start with {prefix=}; names: {sorted(state_dict)[:8]}")
    return out


def deltanet_shape(weights: Mapping[str, np.ndarray]) -> DeltaNetShape:
    """Reads and checks the sizes of an fla DeltaNet layer from its weights.

    Args:
      weights: the layer's ``state_dict`` as arrays, without a prefix.

    Returns:
      The :class:`DeltaNetShape`.

    Raises:
      ValueError: a weight is missing or unexpected, or a shape is unsupported (named).
    """
    required = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    required |= {"o_norm.weight"}
    missing = sorted(required - set(weights))
    if missing:
        raise ValueError(f"not an fla DeltaNet layer: missing {missing}")
    if "b_proj.weight" not in weights:
        raise ValueError("use_beta=False (no b_proj.weight) is not supported")
    convs = [f"{n}_conv1d.weight" for n in "qkv"]
    if not all(c in weights for c in convs):
        raise ValueError(
            "use_short_conv=False is not supported (fla then applies SiLU to v without a "
            f"convolution); missing {[c for c in convs if c not in weights]}"
        )
    if any(f"{n}_conv1d.bias" in weights for n in "qkv"):
        raise ValueError("conv_bias=True is not supported")
    known = required | set(convs) | {"b_proj.weight", "g_proj.weight"}
    unexpected = sorted(set(weights) - known)
    if unexpected:
        raise ValueError(f"unexpected fla DeltaNet weights {unexpected}")
    d = weights["q_proj.weight"].shape[1]
    sizes = {n: weights[f"{n}_proj.weight"].shape[0] for n in "qkv"}
    if set(sizes.values()) != {d}:
        raise ValueError(
            f"projection widths {sizes} must all equal hidden_size={d} (expand_k = expand_v = 1)"
        )
    num_heads = weights["b_proj.weight"].shape[0]
    head_dim = weights["o_norm.weight"].shape[0]
    if num_heads * head_dim != d:
        raise ValueError(f"{num_heads=} × o_norm width {head_dim} != hidden_size={d}")
    conv_size = weights["q_conv1d.weight"].shape[-1]
    for c in convs:
        if weights[c].shape != (d, 1, conv_size):
            raise ValueError(f"{c} has shape {weights[c].shape}; expected {(d, 1, conv_size)}")
    return DeltaNetShape(d, num_heads, conv_size, "g_proj.weight" in weights)


def deltanet_config(
    shape: DeltaNetShape, options: DeltaNetOptions = DeltaNetOptions(), *, impl=Impl.AUTO
) -> FastWeightConfig:
    """The :class:`~fwjax.nn.FastWeightConfig` that computes fla's DeltaNet.

    Args:
      shape: from :func:`deltanet_shape`.
      options: the layer's :class:`DeltaNetOptions`.
      impl: how fwjax computes the delta rule (every implementation gives the same outputs).

    Returns:
      Identity feature map, L2 normalisation of q and k, the delta rule, the short convolution
      (with SiLU), the per-head output RMSNorm with fla's epsilon, and the output gate if used.
    """
    return FastWeightConfig(
        feature_map=FeatureMap(FeatureMapKind.IDENTITY),
        normalization=Normalization.L2,
        update_rule=UpdateRule.DELTA,
        short_conv=True,
        conv_size=shape.conv_size,
        output_norm=True,
        norm_eps=options.norm_eps,
        output_gate=shape.use_gate,
        beta_range=2.0 if options.allow_neg_eigval else 1.0,
        impl=impl,
    )


def deltanet_params(weights: Mapping[str, np.ndarray], shape: DeltaNetShape) -> dict:
    """fla DeltaNet weights rearranged as the parameters of a fwjax layer (the table above).

    Args:
      weights: the layer's ``state_dict`` as arrays, without a prefix.
      shape: from :func:`deltanet_shape`.

    Returns:
      ``{parameter path: float32 array}``, paths as in ``nnx.to_flat_state`` of the layer.
    """
    w = weights
    qkvb = np.concatenate([w[f"{n}_proj.weight"].T for n in "qkvb"], axis=1)
    conv = np.concatenate([w[f"{n}_conv1d.weight"][:, 0, :] for n in "qkv"], axis=0).T
    params = {
        ("qkvb", "kernel"): qkvb,
        ("conv",): conv,
        ("norm", "scale"): w["o_norm.weight"],
        ("out", "kernel"): w["o_proj.weight"].T,
    }
    if shape.use_gate:
        params[("out_gate", "kernel")] = w["g_proj.weight"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}


def from_fla_deltanet(
    state_dict: Mapping[str, np.ndarray],
    options: DeltaNetOptions = DeltaNetOptions(),
    *,
    prefix: str = "",
    impl=Impl.AUTO,
    dtype=jnp.float32,
) -> FastWeightAttention:
    """Builds a :class:`~fwjax.nn.FastWeightAttention` that computes an fla DeltaNet layer.

    Args:
      state_dict: the fla layer's (or model's) ``state_dict`` with arrays as values (e.g.
        ``{k: v.float().numpy() for k, v in layer.state_dict().items()}``).
      options: the hyperparameters the weights do not show (:meth:`DeltaNetOptions.of_layer`).
      prefix: the layer's name prefix in a model's state dict (``"model.layers.0.attn."``).
      impl: fwjax's delta-rule implementation.
      dtype: the compute dtype (parameters are float32).

    Returns:
      The layer; ``layer(x)`` with ``x: [B, T, hidden_size]`` returns ``(y, state)`` where
      ``y`` equals fla's ``layer(x)[0]``.
    """
    weights = _layer_weights(state_dict, prefix)
    shape = deltanet_shape(weights)
    config = deltanet_config(shape, options, impl=impl)
    layer = FastWeightAttention(
        config, shape.hidden_size, shape.num_heads, dtype=dtype, rngs=nnx.Rngs(0)
    )
    params = deltanet_params(weights, shape)
    flat = list(nnx.to_flat_state(nnx.state(layer, nnx.Param)))
    names = {path for path, _ in flat}
    if names != set(params):
        raise RuntimeError(f"fwjax layer parameters {sorted(names)} != {sorted(params)}")
    updated = []
    for path, variable in flat:
        value = params[path]
        if value.shape != variable[...].shape:
            raise ValueError(f"{path}: converted shape {value.shape} != {variable[...].shape}")
        updated.append((path, variable.replace(jnp.asarray(value, variable[...].dtype))))
    nnx.update(layer, nnx.from_flat_state(updated))
    return layer
