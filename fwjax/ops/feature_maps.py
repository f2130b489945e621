"""Feature maps φ and key/query normalisations of linear attention / fast weight memories.

All functions act on the last axis and broadcast over the others (``[..., D] -> [..., K]``).
Non-float32 inputs of lower precision (bfloat16, float16) are computed in float32 and returned in
float32 where exponentials are involved (FAVOR+); the piecewise-linear maps keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math

import jax
import jax.numpy as jnp

from fwjax.shapes import Features, Projection, RawFeatures
from fwjax.validation import check_positive_ints


def elu_p1(x: RawFeatures) -> RawFeatures:
    """``φ(x) = elu(x) + 1`` (Katharopoulos et al., 2020); ``[..., D] -> [..., D]``.

    Evaluated as ``x + 1`` for ``x > 0`` and ``exp(x)`` otherwise: the same function, but without
    the cancellation of ``expm1(x) + 1``, which rounds to 0 in float32 below x ≈ −17. The result
    stays strictly positive down to x ≈ −87 (float32).
    """
    return jnp.where(x > 0, x + 1, jnp.exp(jnp.minimum(x, 0)))


def _check_nu(nu) -> int:
    check_positive_ints(nu=nu)  # DPFP's number of rolls
    return nu


def dpfp(x: RawFeatures, nu: int = 1) -> Features:
    """Deterministic parameter-free projection, DPFP-ν (Schlag et al., 2021, eq. 33).

    ``r = [relu(x), relu(-x)]`` (dimension 2d), ``φ(x) = concat_{j=1..ν} r ⊙ roll(r, j)``
    (dimension 2·d·ν). Non-negative and sparse; ``roll`` is ``jnp.roll`` (= ``torch.roll``)
    along the feature axis, as in the official code.

    Reverse-mode derivatives use a hand-written VJP: with ``ḡ_j`` the cotangent of the j-th
    block, ``r̄ = Σ_j ḡ_j ⊙ roll(r, j) + roll(ḡ_j ⊙ r, −j)``. Autodiff through ``roll`` gives the
    same numbers, but XLA:CPU fuses its transpose (pads and adds) poorly: with the VJP, DPFP-2's
    gradient alone is 4× faster and the synthetic retrieval grid's sum-rule training steps
    1.2–2.9× (``benchmarks/feature_maps.py``). Forward-mode (``jax.jvp``, ``jax.jacfwd``) is
    therefore not available for DPFP.

    Args:
      x: ``[..., D]``.
      nu: number of rolls ν >= 1.

    Returns:
      ``[..., 2·D·ν]``.
    """
    return _dpfp(x, _check_nu(nu))


def _dpfp_r(x):
    return jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dpfp(x, nu):
    r = _dpfp_r(x)
    return jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def _dpfp_fwd(x, nu):
    return _dpfp(x, nu), x


def _dpfp_bwd(nu, x, g):
    r = _dpfp_r(x)
    # φ_j = r ⊙ roll(r, j) is bilinear in r: both factors receive a cotangent.
    r_bar = sum(
        g_j * jnp.roll(r, j, axis=-1) + jnp.roll(g_j * r, -j, axis=-1)
        for j, g_j in zip(range(1, nu + 1), jnp.split(g, nu, axis=-1), strict=True)
    )
    d = x.shape[-1]
    # r = [relu(x), relu(−x)]; relu'(0) = 0, as jax.nn.relu's own derivative.
    zero = jnp.zeros((), r_bar.dtype)
    x_bar = jnp.where(x > 0, r_bar[..., :d], zero) - jnp.where(x < 0, r_bar[..., d:], zero)
    return (x_bar.astype(x.dtype),)


_dpfp.defvjp(_dpfp_fwd, _dpfp_bwd)


def draw_favor_projection(key: jax.Array, d: int, m: int, dtype=jnp.float32) -> jax.Array:
    """Draws FAVOR+'s random projection ``R: [d, m]`` (Choromanski et al., 2021).

    Columns come in blocks of ``d`` mutually orthogonal unit vectors (QR of a Gaussian matrix);
    each column is then rescaled by an independent chi(d)-distributed norm (the norm of a fresh
    Gaussian d-vector), so every column is marginally ``N(0, I_d)`` while columns within a block
    stay orthogonal. This is the official code's ``draw_orthogonal_random_matrix`` (scaling 0).

    Args:
      key: a PRNG key.
      d: input dimension (the head dimension).
      m: number of random features; FAVOR+ then has ``2m`` features.
      dtype: dtype of the result.

    Returns:
      ``[d, m]``.
    """
    check_positive_ints(d=d, m=m)
    n_blocks = math.ceil(m / d)
    block_key, norm_key = jax.random.split(key)
    gauss = jax.random.normal(block_key, (n_blocks, d, d), jnp.float32)
    q, _ = jnp.linalg.qr(gauss)  # orthonormal columns per block
    # Block b's column j becomes column b·d + j (one transpose, not n_blocks slices).
    directions = jnp.transpose(q, (1, 0, 2)).reshape(d, n_blocks * d)[:, :m]  # [d, m]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (m, d), jnp.float32), axis=-1)
    return (directions * norms[None, :]).astype(dtype)


def favor_plus(x: RawFeatures, projection: Projection, *, stabilize: bool = False) -> Features:
    """FAVOR+ positive random features (Choromanski et al., 2021).

    ``φ(x) = (2m)^{-1/2} exp(-‖x‖²/2) [exp(x R), exp(-x R)]``, so that
    ``E[φ(q)·φ(k)] = exp(q·k)`` (unbiased) with ``R: [d, m]`` from :func:`draw_favor_projection`.
    No ``d^{-1/4}`` input scaling is applied (as in the paper's official code); scale the inputs
    yourself if you want it.

    Numerics: the exponent is computed as one term ``±x·r_i − ‖x‖²/2``, which is bounded above by
    ``‖r_i‖²/2`` for every ``x``, so the exact map cannot overflow in float32 while
    ``‖r_i‖² < 176`` (true with overwhelming probability for ``d <= 64``; for larger ``d`` use
    ``stabilize=True``). It can underflow to 0 for large ``‖x‖``.

    Args:
      x: ``[..., d]``.
      projection: ``R``, ``[d, m]``.
      stabilize: subtract, per vector, the maximum exponent before ``exp``. The result is then
        ``φ(x)`` times a positive per-vector factor: EXACT after sum normalisation, L2
        normalisation, or for queries under attention normalisation (the factor cancels), but
        NOT for keys used without one of those, so it is off by default.

    Returns:
      ``[..., 2m]`` in at least float32.
    """
    d, m = projection.shape
    if x.shape[-1] != d:
        raise ValueError(f"x's last axis {x.shape[-1]=} must equal the projection's {d=}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    xr = jnp.einsum("...d,dm->...m", x, projection.astype(dtype))
    half_sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    exponent = jnp.concatenate([xr, -xr], axis=-1) - half_sq_norm
    if stabilize:
        exponent = exponent - jax.lax.stop_gradient(jnp.max(exponent, axis=-1, keepdims=True))
    return jnp.exp(exponent) / math.sqrt(2 * m)


def sum_norm(x: Features) -> Features:
    """Sum normalisation ``x / Σ_j x_j`` along the last axis (Schlag et al., 2021, Sec. 4.2).

    Meant for non-negative features: then every output lies on the simplex and the delta rule's
    transition ``I − β k kᵀ`` has eigenvalues in ``[1 − β, 1]``. Guarded: a vector whose sum is
    exactly 0 (e.g. DPFP of the zero vector) maps to itself instead of 0/0, with finite
    gradients.
    """
    s = jnp.sum(x, axis=-1, keepdims=True)
    return x / jnp.where(s == 0, jnp.ones_like(s), s)


def l2_norm(x: Features, eps: float = 1e-6) -> Features:
    """L2 normalisation ``x / sqrt(Σ_j x_j² + eps)`` along the last axis (DeltaNet, 2024).

    Computed in at least float32 and returned in the input dtype.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def centered_l2_norm(x: Features, eps: float = 1e-6) -> Features:
    """Centred L2 normalisation ``c / sqrt(‖c‖² + eps)``, ``c = x − mean_j(x_j)`` (fwjax's own).

    Positive feature maps (ELU+1, DPFP, FAVOR+) put every key in the positive orthant, so any
    two keys have a positive cosine and every delta-rule write to one key also partly removes
    what is stored under all the others. Removing the common (mean) component before the unit-norm
    projection keeps the exact single-step overwrite of L2 keys (``β = 1`` replaces the value
    stored under ``k``) while making unrelated keys closer to orthogonal. Invariant to a positive
    scale and to a shift of ``x``; computed in at least float32, returned in the input dtype.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    c = xf - jnp.mean(xf, axis=-1, keepdims=True)
    return (c * jax.lax.rsqrt(jnp.sum(c * c, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class FeatureMapKind(enum.Enum):
    """Which feature map φ a :class:`FeatureMap` applies."""

    IDENTITY = "identity"
    ELU_P1 = "elu_p1"
    DPFP = "dpfp"
    FAVOR_PLUS = "favor_plus"


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """A feature map φ as a validated, hashable configuration (usable as a static jit argument).

    Attributes:
      kind: which map.
      nu: DPFP's ν (number of rolls); only for ``DPFP``.
      num_features: FAVOR+'s m (``R: [d, m]``, feature dimension 2m); only for ``FAVOR_PLUS``.
    """

    kind: FeatureMapKind = FeatureMapKind.ELU_P1
    nu: int = 1
    num_features: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", FeatureMapKind(self.kind))
        _check_nu(self.nu)
        if self.kind is not FeatureMapKind.DPFP and self.nu != 1:
            raise ValueError(f"nu={self.nu} only applies to DPFP, not kind={self.kind}")
        if self.kind is FeatureMapKind.FAVOR_PLUS:
            check_positive_ints(num_features=self.num_features)  # FAVOR+'s m
        elif self.num_features is not None:
            raise ValueError(
                f"num_features={self.num_features} only applies to FAVOR+, not kind={self.kind}"
            )

    @property
    def needs_projection(self) -> bool:
        return self.kind is FeatureMapKind.FAVOR_PLUS

    def output_dim(self, d: int) -> int:
        """Dimension of ``φ(x)`` for inputs of dimension ``d``."""
        if self.kind is FeatureMapKind.DPFP:
            return 2 * d * self.nu
        if self.kind is FeatureMapKind.FAVOR_PLUS:
            return 2 * self.num_features
        return d

    def __call__(
        self, x: RawFeatures, projection: Projection | None = None, *, stabilize: bool = False
    ) -> Features:
        """Applies φ to ``x: [..., d]``; ``projection`` (``[d, m]``) only for FAVOR+."""
        if self.kind is FeatureMapKind.FAVOR_PLUS:
            if projection is None:
                raise ValueError("FAVOR+ needs a projection; see draw_favor_projection")
            if projection.shape[-1] != self.num_features:
                raise ValueError(
                    f"projection.shape={projection.shape} does not have "
                    f"num_features={self.num_features} columns"
                )
            return favor_plus(x, projection, stabilize=stabilize)
        if projection is not None:
            raise ValueError(f"a projection was given, but kind={self.kind} takes none")
        if self.kind is FeatureMapKind.DPFP:
            return dpfp(x, self.nu)
        if self.kind is FeatureMapKind.ELU_P1:
            return elu_p1(x)
        return x
