"""Rematerialisation of module methods (``jax.checkpoint``) as pure functions of the module's
state, and the policies of :class:`~fwjax.nn.config.Remat`.

``nnx.remat`` cannot write a module's updated variables (e.g. dropout's RNG counters) back when
the module was merged inside a plain JAX transform (the training step's ``jax.value_and_grad``):
:func:`rematerialised` splits the module, runs the method on a copy merged inside
``jax.checkpoint``, and afterwards updates the module with the variables the method wrote.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from fwjax.nn.config import Remat

# The ``jax.checkpoint`` policy of each Remat that checkpoints a whole block (None: save only
# the inputs). FAST_WEIGHT checkpoints the pieces around the fast weight op instead.
BLOCK_POLICIES = {
    Remat.FULL: None,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    Remat.FAST_WEIGHT: None,  # blocks without a fast weight op
}


def rematerialised(method: Callable, policy=None) -> Callable:
    """``method(module, *args)`` recomputed in the backward pass (``jax.checkpoint`` with
    ``policy``; None keeps only the inputs).

    Args:
      method: an unbound method or function whose first argument is an ``nnx.Module``; its other
        arguments and its result are pytrees of arrays (or None).
      policy: a ``jax.checkpoint_policies`` policy, or None.

    Returns:
      ``call(module, *args)``: the method's result; the module's variables are updated as the
      method updated them.
    """

    def call(module: nnx.Module, *args):
        graphdef, state = nnx.split(module)
        written = []  # per variable: did the method write it (known when tracing)

        @functools.partial(jax.checkpoint, policy=policy)
        def pure(state, *args):
            before = variable_leaves(state)
            copy = nnx.merge(graphdef, state)
            out = method(copy, *args)
            new = nnx.state(copy)
            written[:] = written_variables(before, new)
            return out, new

        out, new_state = pure(state, *args)
        update_written(module, new_state, written)
        return out

    return call


def variable_leaves(state: nnx.State) -> list[list]:
    """The arrays of each variable of ``state`` (in ``nnx.to_flat_state`` order); take them
    before running code on a module merged from ``state`` (``nnx.merge`` reuses the variables,
    so the state changes with the module)."""
    return [jax.tree.leaves(v) for _, v in nnx.to_flat_state(state)]


def written_variables(before: list[list], after: nnx.State) -> list[bool]:
    """Per variable: whether ``after`` holds other arrays than ``before``
    (:func:`variable_leaves` taken before the code ran; while tracing, another array object
    means the traced code wrote the variable)."""
    pairs = zip(variable_leaves(after), before, strict=True)
    return [any(x is not y for x, y in zip(a, b, strict=True)) for a, b in pairs]


def update_written(module: nnx.Module, new_state: nnx.State, written: list[bool]) -> None:
    """Writes back only the variables ``written`` marks: the module's other variables may
    belong to an outer trace (e.g. merged from a state passed through ``jax.grad``) and cannot
    be set here."""
    flat = [item for item, w in zip(nnx.to_flat_state(new_state), written, strict=True) if w]
    if flat:
        nnx.update(module, nnx.from_flat_state(flat))
