"""Implementation choice, dtype policy and input validation shared by every fast weight op.

Each rule (``delta_rule``, ``sum_rule``, ``gated_delta_rule``) has one file per implementation
(``reference.py``, ``recurrent.py``, ``chunked.py``, ``pallas.py``), and every form, PALLAS
included, has the same signature::

    form(q, k, v, gates, initial_state, scale, options: FormOptions) -> (out, final_state)

with ``gates`` the rule's ``[B, T, H]`` inputs (``()``, ``(β,)`` or ``(β, α)``). The forms are
entries of one table per rule (:mod:`fwjax.ops.registry`), called only after
:func:`prepare_inputs` has validated shapes and fixed the dtypes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from fwjax.validation import check_positive_ints

if TYPE_CHECKING:
    from fwjax.ops.pallas import PallasOptions


class Impl(enum.Enum):
    """How a fast weight op is computed. All forms agree to the tolerance of the parity suite.

    Attributes:
      AUTO: the fastest measured form for the current default backend (see :func:`resolve_impl`).
      REFERENCE: the literal step-by-step equations of one head, vmapped, at the highest matmul
        precision, differentiated by plain autodiff. The oracle; slow, stores every state.
        (The sum rule also has the causal-masked quadratic form, ``sum_rule_quadratic``.)
      RECURRENT: a ``lax.scan`` over time carrying the ``[B, H, K, V]`` state, with a
        hand-written reverse-scan backward that rebuilds past states instead of storing them;
        also the decode path (``delta_rule_step``, ``sum_rule_step``).
      CHUNKED: the chunkwise-parallel form (WY / UT transform for the delta rule), with a
        hand-written backward that keeps one state per chunk and recomputes the intra-chunk
        terms.
      PALLAS: the chunked form with its sequential phase as a Pallas kernel (one program per
        batch element, head and value tile, the fp32 state tile on chip across chunks) and a
        ``custom_vjp`` whose backward is a reverse Pallas kernel (or, by option, the XLA
        reverse scan of CHUNKED). GPU via Triton, TPU via Mosaic; on CPU in interpret mode.
        Options: :class:`fwjax.ops.pallas.PallasOptions` (the ops' ``pallas=`` argument).
    """

    AUTO = "auto"
    REFERENCE = "reference"
    RECURRENT = "recurrent"
    CHUNKED = "chunked"
    PALLAS = "pallas"

    @property
    def chunkwise(self) -> bool:
        """Whether the form mixes the steps of a chunk in matmuls (CHUNKED and PALLAS): the
        forms that take ``chunk_size`` and need :func:`guard_nonfinite`."""
        return self in (Impl.CHUNKED, Impl.PALLAS)


# Default chunk size per backend platform. On XLA:CPU, C=32 gave the best throughput of the
# chunked form (measured on a 2-core x86 CPU); accelerators want larger tiles for their matrix
# units.
_DEFAULT_CHUNK_SIZE = {"cpu": 32, "gpu": 64, "cuda": 64, "rocm": 64, "tpu": 64}

# AUTO per backend platform. On XLA:CPU the per-token scan is the fastest measured form in the
# forward pass and on par with the best chunked form (C=32) in forward + backward, with less
# memory (benchmarks/README.md); on GPU/TPU the chunked form's matmuls run on matrix units.
_AUTO_IMPL = {"cpu": Impl.RECURRENT}


def _platform() -> str:
    return jax.default_backend()


def resolve_impl(impl: Impl | str) -> Impl:
    """Returns a concrete :class:`Impl`, resolving ``AUTO`` for the default backend.

    Raises:
      ValueError: ``impl`` is not an :class:`Impl` or one of its values (the message lists
        them).
    """
    try:
        impl = Impl(impl)
    except ValueError:
        valid = [i.value for i in Impl]
        raise ValueError(f"{impl=} is not one of {valid} (or an fwjax.ops.Impl)") from None
    if impl is Impl.AUTO:
        return _AUTO_IMPL.get(_platform(), Impl.CHUNKED)
    return impl


def resolve_chunk_size(chunk_size: int | None, name: str = "chunk_size") -> int:
    """Returns ``chunk_size``, or the backend's default chunk length when it is None."""
    check_positive_ints(allow_none=True, **{name: chunk_size})
    return _DEFAULT_CHUNK_SIZE.get(_platform(), 64) if chunk_size is None else chunk_size


@dataclasses.dataclass(frozen=True)
class FormOptions:
    """The static parameters every form receives; each form reads the ones it uses.

    Attributes:
      chunk_size: the chunk length ``C`` of the chunkwise forms (CHUNKED, PALLAS). PALLAS runs
        the kernel on ``Tiling.chunk``, ``C`` rounded up to its backend's tile
        (:func:`fwjax.ops.pallas.kernel_config`).
      remat_block: the steps per rematerialised block of the gated delta rule's RECURRENT
        backward pass.
      pallas: the :class:`fwjax.ops.pallas.PallasOptions` of PALLAS; None: the defaults.
      out_dtype: the inputs' promoted dtype (PALLAS's default matmul operand dtype).
      state_segments: the CHUNKED form of the delta and gated delta rules, and their PALLAS
        form under ``PallasSchedule.PHASED``, run their chunk scans as this many parallel
        segments (:mod:`fwjax.ops.state_split`); None: one sequential scan.
    """

    chunk_size: int
    remat_block: int
    pallas: PallasOptions | None
    out_dtype: jnp.dtype
    state_segments: int | None = None


def state_dtype(*dtypes) -> jnp.dtype:
    """The dtype of the state and of accumulation: the inputs' promoted dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


class Prepared(NamedTuple):
    """Validated inputs of a fast weight op, with the dtypes it computes and returns in."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    gates: tuple[jax.Array, ...]
    initial_state: jax.Array
    compute_dtype: jnp.dtype
    out_dtype: jnp.dtype


def prepare_inputs(q, k, v, gates: Mapping[str, jax.Array | None], initial_state) -> Prepared:
    """Validates shapes and applies the dtype policy.

    Shapes: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, each gate (``gates`` maps the rule's
    names, e.g. ``{"beta": beta}``, to arrays) ``[B, T, H]``, ``initial_state: [B, H, K, V]`` or
    None (zeros).

    Dtypes: the output has the inputs' promoted dtype (``q, k, v``); the state and all
    accumulation use that dtype promoted to at least float32 (bfloat16 inputs give a float32
    state; float64 inputs, with ``jax_enable_x64``, compute in float64). The gates and an
    initial state take part in the promotion, so a float64 state is never silently truncated.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D]; got {name}.shape={x.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got {q.shape=} and {k.shape=}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in [B, T, H]; got {v.shape=} and {k.shape=}")
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    checked = [("q", q), ("k", k), ("v", v)]
    for name, g in gates.items():
        if g is None:
            raise ValueError(f"{name} of shape [B, T, H] is needed; got {name}=None")
        g = jnp.asarray(g)
        if g.shape != k.shape[:3]:
            raise ValueError(
                f"{name} must have shape [B, T, H]={k.shape[:3]}; got {name}.shape={g.shape}"
            )
        checked.append((name, g))
    for name, x in checked:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point; got {name}.dtype={x.dtype}")
    dtypes = [x.dtype for _, x in checked]
    expected_state = (batch, heads, key_dim, value_dim)
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        if initial_state.shape != expected_state:
            raise ValueError(
                f"initial_state must have shape [B, H, K, V]={expected_state}; "
                f"got {initial_state.shape=}"
            )
        dtypes.append(initial_state.dtype)
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    compute_dtype = state_dtype(*dtypes)
    if initial_state is None:
        initial_state = jnp.zeros(expected_state, compute_dtype)
    else:
        initial_state = initial_state.astype(compute_dtype)
    gates = tuple(g for _, g in checked[3:])
    return Prepared(q, k, v, gates, initial_state, compute_dtype, out_dtype)


def resolve_scale(scale, key_dim: int):
    """The output scale: ``scale`` as given, or ``key_dim ** -0.5`` when it is None (the
    convention of flash-linear-attention)."""
    return key_dim**-0.5 if scale is None else scale


def empty_sequence(p: Prepared) -> tuple[jax.Array, jax.Array]:
    """The result of a fast weight op over ``T = 0`` steps: an empty output ``[B, 0, H, V]``
    and the initial state (differentiable: its cotangent passes straight through)."""
    b, _, h, _ = p.k.shape
    return jnp.zeros((b, 0, h, p.v.shape[-1]), p.out_dtype), p.initial_state


class NonFiniteSteps(NamedTuple):
    """Where the inputs of a chunkwise form are not finite.

    Attributes:
      read: ``[B, T, H]``: the query of step t is not finite (only ``o_t`` depends on it).
      write: ``[B, T, H, V]``: the write of step t into value column j is not finite (its key,
        β or α, or its value ``v_t[j]``); column j of the state from step t on, and of every
        later output, depends on it.
    """

    read: jax.Array
    write: jax.Array


def _finite_rows(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x), axis=-1) if x.ndim == 4 else jnp.isfinite(x)


def guard_nonfinite(q, k, v, gates) -> tuple[tuple, NonFiniteSteps]:
    """Replaces non-finite entries of the inputs by zero, remembering where they were.

    The chunkwise forms mix every step of a chunk in matmuls (``Q Kᵀ``, the triangular inverse,
    ``W = T K``) whose masked-out products are ``0 · x``; a NaN or infinity at step t would turn
    them into NaN for the earlier steps of its chunk. Computed on cleaned inputs, outputs before
    t are exact; :func:`restore_nonfinite` then puts NaN where the recurrence has it. The cost
    is a few elementwise passes and one reduction over time: +4–8 % for CHUNKED's forward and
    forward + backward at B4 T2048 H8 d64, C 32 (2 shared CPU cores, float32).

    Args:
      q, k, v: ``[B, T, H, K|V]``.
      gates: the per-step ``[B, T, H]`` inputs that write, as ``(array, neutral value)``
        pairs: ``(β, 0.0)`` writes nothing, ``(α, 1.0)`` decays nothing (``log α`` stays
        finite).

    Returns:
      ``((q, k, v, *gates), steps)``: the cleaned inputs and the :class:`NonFiniteSteps`.
    """

    def clean(x, fill=0.0):
        return jnp.where(jnp.isfinite(x), x, jnp.asarray(fill, x.dtype))

    whole_write = ~_finite_rows(k)
    for g, _ in gates:
        whole_write = whole_write | ~_finite_rows(g)
    write = whole_write[..., None] | ~jnp.isfinite(v)
    cleaned = (clean(q), clean(k), clean(v), *(clean(g, fill) for g, fill in gates))
    return cleaned, NonFiniteSteps(~_finite_rows(q), write)


def restore_nonfinite(out, state, steps: NonFiniteSteps):
    """NaN in ``out [B, T, H, V]`` and ``state [B, H, K, V]`` where the step-by-step recurrence
    has it: at steps with a non-finite query, in a value column at and after its first
    non-finite write, and in the final state's columns written with a non-finite value."""
    t = steps.write.shape[1]
    steps_index = jnp.arange(t, dtype=jnp.int32)[None, :, None, None]
    # The first non-finite write per [B, H, V] (T when none): a reduction, not a scan over T.
    first = jnp.min(jnp.where(steps.write, steps_index, t), axis=1, keepdims=True)
    bad_out = steps.read[..., None] | (steps_index >= first)
    out = jnp.where(bad_out, jnp.array(jnp.nan, out.dtype), out)
    bad_state = jnp.any(steps.write, axis=1)[:, :, None, :]
    state = jnp.where(bad_state, jnp.array(jnp.nan, state.dtype), state)
    return out, state
