"""The optimizer and learning-rate schedule of :class:`~fwjax.train.config.OptimizerConfig`."""

from __future__ import annotations

import jax
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
    masked to matrices when ``decay_matrices_only``)."""
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
