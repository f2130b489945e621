"""Fast weight memory diagnostics: how full, how well-read, how diverse a memory is over time.

For a memory written with keys ``k_t`` (after φ and normalisation), values ``v_t`` and write
strengths ``β_t`` (and decay gates ``α_t``), per batch element, head and step::

    v̄_t  = S_{t-1}ᵀ k_t / d_t          the value the memory returns for k_t BEFORE writing
                                        (d_t = z_{t-1}ᵀ k_t under attention normalisation, else 1)
    retrieval_error_t  = ‖v_t − v̄_t‖    what the write has to correct
    retrieval_cosine_t = cos(v̄_t, v_t)  (0 where v̄_t = 0)
    state_norm_t       = ‖S_t‖_F        growth of the fast weights

and, of a state, its effective rank ``exp(H(σ / Σσ))`` (Roy & Vetterli, 2007) over the singular
values σ of each head's ``S``. These answer the paper's open questions: whether a rule balances
writing and removing (the contrast between ``v̄`` and ``v``) and whether the fast weights grow
without bound over many steps.

Everything here is opt-in: the layers compute it only with ``FastWeightConfig(diagnostics=True)``
(one extra ``O(T·K·V)`` scan), and :func:`summarize` reduces it to a few numbers per head for the
training loop's metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class Replay(NamedTuple):
    """A memory's writes replayed step by step (:func:`replay_writes`); ``V`` the value width.

    Attributes:
      retrieved: ``v̄_t [B, T, H, V]``, the memory's read at ``k_t`` BEFORE the write (divided
        by ``d_t = z_{t-1}ᵀ k_t`` under attention normalisation).
      state_norm: ``‖S_t‖_F [B, T, H]`` after each write.
      final_state: ``S_T [B, H, K, V]``.
      final_normalizer: ``z_T = z_0 + Σ_t k_t [B, H, K]``.
      read_after: ``S_tᵀ k_t / (z_tᵀ k_t) [B, T, H, V]``, the read at ``k_t`` right AFTER the
        write (as the model reads), when asked for; else None.
      states: ``S_t [B, T, H, K, V]`` after every write, when asked for; else None.
    """

    retrieved: jax.Array
    state_norm: jax.Array
    final_state: jax.Array
    final_normalizer: jax.Array
    read_after: jax.Array | None = None
    states: jax.Array | None = None


def replay_writes(
    k,
    v,
    beta=None,
    alpha=None,
    *,
    initial_state=None,
    initial_normalizer=None,
    attention_normalized: bool = False,
    read_after: bool = False,
    keep_states: bool = False,
) -> Replay:
    """Replays a fast weight memory's writes one step at a time (a ``lax.scan``), recording
    what every step reads and writes: the one replay behind :func:`memory_trace`,
    :func:`fwjax.explain.fast_weight_snapshots` and the normalisation study.

    Per batch element and head, with ``v̄_t = S_{t-1}ᵀ k_t / d_t`` (``d_t = z_{t-1}ᵀ k_t``
    under attention normalisation, 1 where that is 0; else 1) and ``z_t = z_{t-1} + k_t``:

    * sum rule (``beta`` None): ``S_t = S_{t-1} + k_t v_tᵀ``;
    * delta rule: ``S_t = S_{t-1} + β_t k_t (v_t − v̄_t)ᵀ``;
    * gated delta rule (``alpha``): ``S_t = α_t S_{t-1} + β_t k_t (v_t − α_t v̄_t)ᵀ``.

    Computed in ``promote_types(dtype(k, v), float32)`` with HIGHEST matmul precision.

    Args:
      k: memory keys ``[B, T, H, K]`` (after the feature map and normalisation).
      v: values ``[B, T, H, V]``.
      beta: write strengths ``[B, T, H]``, or None for the sum rule.
      alpha: decay gates ``[B, T, H]`` (gated delta rule), or None.
      initial_state: ``S_0 [B, H, K, V]``; zeros when None.
      initial_normalizer: ``z_0 [B, H, K]``; zeros when None.
      attention_normalized: divide reads by ``zᵀ k`` (the paper's attention normalisation).
      read_after: also record the read right after each write (:attr:`Replay.read_after`).
      keep_states: also record every ``S_t`` (``O(T·K·V)`` memory; for short sequences).

    Returns:
      A :class:`Replay`.
    """
    dtype = jnp.promote_types(jnp.result_type(k, v), jnp.float32)
    k, v = k.astype(dtype), v.astype(dtype)
    b, t, h, kd = k.shape
    s0 = jnp.zeros((b, h, kd, v.shape[-1]), dtype) if initial_state is None else initial_state
    z0 = jnp.zeros((b, h, kd), dtype) if initial_normalizer is None else initial_normalizer
    ones = jnp.ones((b, t, h), dtype)
    beta_ = ones if beta is None else beta.astype(dtype)
    alpha_ = ones if alpha is None else alpha.astype(dtype)

    def read(s, z, k_t):
        r = jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=_HIGHEST)
        if not attention_normalized:
            return r
        d = jnp.einsum("bhk,bhk->bh", z, k_t, precision=_HIGHEST)
        return r / jnp.where(d == 0, 1.0, d)[..., None]

    def step(carry, inputs):
        s, z = carry
        k_t, v_t, beta_t, alpha_t = inputs
        v_bar = read(s, z, k_t)
        # Sum rule: u_t = v_t; (gated) delta rule: u_t = β_t (v_t − α_t v̄_t).
        u = v_t if beta is None else beta_t[..., None] * (v_t - alpha_t[..., None] * v_bar)
        s = alpha_t[..., None, None] * s + k_t[..., :, None] * u[..., None, :]
        z = z + k_t
        out = (v_bar, jnp.sqrt(jnp.sum(s**2, axis=(-2, -1))))
        out += (read(s, z, k_t) if read_after else None, s if keep_states else None)
        return (s, z), out

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (k, v, beta_, alpha_))
    (s, z), outs = jax.lax.scan(step, (s0.astype(dtype), z0.astype(dtype)), xs)
    v_bar, norm, after, states = (None if o is None else jnp.moveaxis(o, 0, 1) for o in outs)
    return Replay(v_bar, norm, s, z, after, states)


class MemoryTrace(NamedTuple):
    """Per-step diagnostics, each ``[B, T, H]`` (float32)."""

    state_norm: jax.Array
    retrieval_error: jax.Array
    retrieval_cosine: jax.Array


def memory_trace(
    k,
    v,
    beta=None,
    alpha=None,
    initial_state=None,
    *,
    attention_normalized: bool = False,
    initial_normalizer=None,
) -> tuple[MemoryTrace, jax.Array]:
    """Replays the memory's writes step by step (:func:`replay_writes`, in float32) and records
    the diagnostics: ``state_norm_t = ‖S_t‖_F``, ``retrieval_error_t = ‖v_t − v̄_t‖`` and
    ``retrieval_cosine_t = cos(v̄_t, v_t)`` (0 where ``v̄_t = 0``).

    Rules: sum (``beta=None``: ``S_t = S_{t-1} + k_t v_tᵀ``), delta
    (``S_t = S_{t-1} + β_t k_t (v_t − v̄_t)ᵀ``) and gated delta
    (``S_t = α_t S_{t-1} + β_t k_t (v_t − α_t v̄_t)ᵀ``, with ``alpha``).

    Args:
      k: memory keys ``[B, T, H, K]`` (after the feature map and normalisation).
      v: values ``[B, T, H, V]``.
      beta: write strengths ``[B, T, H]``, or None for the sum rule.
      alpha: decay gates ``[B, T, H]`` (gated delta rule), or None.
      initial_state: ``[B, H, K, V]``, zeros when None.
      attention_normalized: divide retrievals by ``d_t = z_{t-1}ᵀ k_t`` (z = running key sum;
        1 where it is 0), the paper's attention-normalised delta rule.
      initial_normalizer: ``z_0 [B, H, K]`` for a carried attention-normalised memory.

    Returns:
      ``(MemoryTrace, final state [B, H, K, V])``.
    """
    f32 = jnp.float32
    v = v.astype(f32)
    replay = replay_writes(
        k.astype(f32),
        v,
        beta,
        alpha,
        initial_state=None if initial_state is None else initial_state.astype(f32),
        initial_normalizer=None if initial_normalizer is None else initial_normalizer.astype(f32),
        attention_normalized=attention_normalized,
    )
    v_bar = replay.retrieved
    nv, nb = jnp.linalg.norm(v, axis=-1), jnp.linalg.norm(v_bar, axis=-1)
    cos = jnp.where(nb > 0, jnp.sum(v * v_bar, -1) / jnp.maximum(nv * nb, 1e-30), 0.0)
    error = jnp.linalg.norm(v - v_bar, axis=-1)
    return MemoryTrace(replay.state_norm, error, cos), replay.final_state


def effective_rank(state, eps: float = 1e-12):
    """``exp`` of the entropy of the normalised singular values of each ``[..., K, V]`` matrix.

    Returns ``[...]``; 1 for a rank-one matrix, ``min(K, V)`` for equal singular values, 0 for
    a zero matrix.
    """
    sv = jnp.linalg.svd(state.astype(jnp.float32), compute_uv=False)
    total = jnp.sum(sv, axis=-1, keepdims=True)
    p = sv / jnp.maximum(total, eps)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, eps)), 0.0), axis=-1)
    return jnp.where(total[..., 0] > eps, jnp.exp(entropy), 0.0)


def summarize(trace: MemoryTrace, final_state, beta=None) -> dict[str, jax.Array]:
    """A few numbers per head (``[H]`` each, averaged over the batch) for logging.

    Keys: ``state_norm_final``, ``state_norm_max``, ``retrieval_error``, ``retrieval_cosine``
    (means over steps), ``effective_rank`` (of the final state), and ``beta_mean`` /
    ``beta_std`` when ``beta [B, T, H]`` is given.
    """
    mean_bt = lambda x: jnp.mean(x, axis=(0, 1))
    out = {
        "state_norm_final": jnp.mean(trace.state_norm[:, -1], axis=0),
        "state_norm_max": jnp.mean(jnp.max(trace.state_norm, axis=1), axis=0),
        "retrieval_error": mean_bt(trace.retrieval_error),
        "retrieval_cosine": mean_bt(trace.retrieval_cosine),
        "effective_rank": jnp.mean(effective_rank(final_state), axis=0),
    }
    if beta is not None:
        out["beta_mean"] = mean_bt(beta.astype(jnp.float32))
        out["beta_std"] = jnp.std(beta.astype(jnp.float32), axis=(0, 1))
    return out


def carried_memory_norms(layers) -> dict[str, jax.Array]:
    """Norms of a carried memory, per layer and head: how far a state has grown.

    For every fast weight layer state (anything with ``fast_weights [B, H, K, V]`` and
    ``normalizer [B, H, K] | None``, e.g. :class:`fwjax.ops.FastWeightState`, or an object
    holding one as ``.memory``) this returns ``‖S‖_F`` and, under attention normalisation,
    ``‖z‖₂`` of the key accumulator ``z = Σ_t φ(k_t)`` (the normaliser whose growth shrinks
    every read ``Sᵀφ(q) / zᵀφ(q)``). Layers without fast weights (a softmax KV cache) are
    skipped.

    Args:
      layers: a sequence of per-layer states (``TransformerLM``'s ``LMState.layers``).

    Returns:
      ``{"state_norm": [L, B, H], "normalizer_norm": [L, B, H]}`` (float32; L = the number of
      fast weight layers); ``normalizer_norm`` is absent when no layer keeps a ``z``.
    """
    s_norms, z_norms = [], []
    for layer in layers:
        memory = getattr(layer, "memory", layer)
        s = getattr(memory, "fast_weights", None)
        if s is None:
            continue
        s_norms.append(jnp.sqrt(jnp.sum(jnp.square(s.astype(jnp.float32)), axis=(-2, -1))))
        z = getattr(memory, "normalizer", None)
        if z is not None:
            z_norms.append(jnp.linalg.norm(z.astype(jnp.float32), axis=-1))
    out = {"state_norm": jnp.stack(s_norms)}
    if z_norms:
        if len(z_norms) != len(s_norms):
            raise ValueError(f"{len(z_norms)=} normalisers for {len(s_norms)=} fast weight layers")
        out["normalizer_norm"] = jnp.stack(z_norms)
    return out
