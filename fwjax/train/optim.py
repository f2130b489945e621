"""The optimizer and learning-rate schedule of :class:`~fwjax.train.config.OptimizerConfig`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwjax.train.config import OptimizerConfig, OptimizerKind, ScheduleKind


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant or cosine
    decay to ``final_lr_fraction · learning_rate`` at ``total_steps``."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, total_steps)
    if config.schedule is ScheduleKind.CONSTANT:
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(
            peak, max(total_steps - warmup, 1), alpha=config.final_lr_fraction
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if ``clip_norm``), then Adam or AdamW on the schedule (AdamW's decay
    masked to matrices when ``decay_matrices_only``), with float32 master weights for
    parameters stored in a lower precision (:func:`with_master_weights`)."""
    return with_master_weights(_base_optimizer(config, total_steps))


def _base_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(config, total_steps)
    if config.kind is OptimizerKind.ADAMW:
        mask = matrices_mask if config.decay_matrices_only else None
        opt = optax.adamw(
            lr, config.b1, config.b2, config.eps, weight_decay=config.weight_decay, mask=mask
        )
    else:
        opt = optax.adam(lr, config.b1, config.b2, config.eps)
    if config.clip_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)


def matrices_mask(params):
    """True for every parameter leaf with two or more axes (weights, embedding tables)."""
    return jax.tree.map(lambda x: np.ndim(x) >= 2, params)


class MasterWeightsState(NamedTuple):
    """The optimizer state of :func:`with_master_weights` when parameters are stored in a low
    precision: float32 copies of every parameter and the wrapped optimizer's state."""

    master: Any
    inner: Any


def _low_precision(params) -> bool:
    return any(
        jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4
        for x in jax.tree.leaves(params)
    )


def with_master_weights(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with float32 master weights when any parameter is stored below float32.

    Mixed precision as in Micikevicius et al. (2018): the optimizer runs in float32 on a master
    copy ``m`` of the parameters (gradients cast up), and the stored parameters are its
    rounding, ``p ← bf16(m + Δ)``, so updates smaller than a bfloat16 ulp accumulate instead of
    vanishing. With float32 parameters ``tx`` runs unchanged, state and all (its checkpoints
    are those of ``tx``).

    The new parameters are read from the state with :func:`apply_updates` (``p + Δ`` rounded
    in bfloat16 would not be the rounding of ``m + Δ``).
    """

    def init(params):
        if not _low_precision(params):
            return tx.init(params)
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, tx.init(master))

    def update(grads, state, params=None):
        if not isinstance(state, MasterWeightsState):
            return tx.update(grads, state, params)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner = tx.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        # The stored parameters' change (what apply_updates returns for them).
        if params is not None:
            updates = jax.tree.map(lambda m, p: m.astype(p.dtype) - p, master, params)
        return updates, MasterWeightsState(master, inner)

    return optax.GradientTransformation(init, update)


def apply_updates(params, updates, opt_state):
    """The parameters after an update of :func:`with_master_weights`' optimizer: the rounding
    of the float32 master weights when it keeps them, else ``params + updates``."""
    if isinstance(opt_state, MasterWeightsState):
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params)
    return optax.apply_updates(params, updates)
