"""The training state and the pure, jitted ``train_step`` / ``eval_step``.

``train_step(state, batch) -> (state, metrics)`` is a pure function of its inputs: the step's
randomness (dropout, FAVOR+ redraws) is ``fold_in(key(seed), step)``, so a run restored from a
checkpoint at step ``s`` continues exactly as the uninterrupted run would. The model is split
once into a static graph definition and array states (``nnx.split``); the step merges them
inside the traced function (``nnx.merge``), so nothing stateful crosses ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from fwjax.nn.attention import SOWING_WITHOUT_CAPTURE
from fwjax.train import mesh as mesh_lib
from fwjax.train import optim


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly (the checkpointed pytree).

    Attributes:
      step: optimizer steps taken (also the data position: batch ``step`` comes next).
      params: the model's ``nnx.Param`` state.
      rest: other model state (FAVOR+ projections), without RNG streams (reseeded every step).
      opt_state: the optimizer's state.
      carry: state carried from one batch to the next (LM fast weights), or an empty tuple.
      nonfinite_count: consecutive steps whose update was skipped as non-finite.
      last_nonfinite_step: the last such step, −1 if none.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    carry: Any
    nonfinite_count: jax.Array
    last_nonfinite_step: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static halves of the model: graph definitions in train and eval mode, and the RNG
    stream state template (its keys are replaced every step by ``nnx.reseed``)."""

    train_graph: Any
    eval_graph: Any
    rng_state: Any

    def merge(self, params, rest, *, train: bool):
        graph = self.train_graph if train else self.eval_graph
        # Fresh RNG variables at the caller's trace level (layers that write their variables
        # back, e.g. rematerialised blocks, may then update them inside a jitted step).
        rng_state = jax.tree.map(lambda x: x, self.rng_state)
        return nnx.merge(graph, params, rng_state, rest)


def _split(model):
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def create_train_state(
    task, tx: optax.GradientTransformation, mesh: Mesh, seed: int, batch_size, rules=None
):
    """Initialises the model and optimizer directly into their shardings (``rules``: the
    default logical-axis rules, :func:`fwjax.train.mesh.state_shardings`).

    ``jax.eval_shape`` gives the state's structure and logical partition specs without
    allocating; the initialiser is then jitted with those output shardings, so every device
    creates only its own shard.

    Returns:
      ``(state, model_def, state_shardings)``.
    """
    key = jax.random.key(seed)

    def init():
        rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), dropout=jax.random.fold_in(key, 1))
        model = task.build_model(rngs)
        _, params, rng_state, rest = _split(model)
        carry = task.init_carry(model, batch_size)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            rest=rest,
            opt_state=tx.init(params),
            carry=() if carry is None else carry,
            nonfinite_count=jnp.zeros((), jnp.int32),
            last_nonfinite_step=jnp.full((), -1, jnp.int32),
        )
        return state, rng_state

    abstract, abstract_rng = jax.eval_shape(init)
    shardings = mesh_lib.state_shardings(mesh, abstract, rules)
    # The carry holds per-sequence state: split its batch axis over `data` like the batch.
    shardings = shardings._replace(carry=carry_shardings(mesh, abstract.carry, batch_size))
    rng_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_rng)
    state, rng_state = jax.jit(init, out_shardings=(shardings, rng_shardings))()

    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=0, dropout=1)))
    model.train()
    train_graph = _split(model)[0]
    model.eval()
    eval_graph = _split(model)[0]
    return state, ModelDef(train_graph, eval_graph, rng_state), shardings


def carry_shardings(mesh: Mesh, abstract_carry, batch_size: int):
    """Leaves with a leading batch axis are split over ``data``; others are replicated."""

    def pick(x):
        if x.ndim and x.shape[0] == batch_size:
            return mesh_lib.batch_sharding(mesh, x.ndim)
        return mesh_lib.replicated(mesh)

    return jax.tree.map(pick, abstract_carry)


def _none_if_empty(carry):
    return None if isinstance(carry, tuple) and not carry else carry


def _reseeded(rng_state, key):
    """The RNG stream state with fresh keys from ``key`` and zeroed counters (pure)."""
    leaves, treedef = jax.tree.flatten(rng_state)

    def fresh_key(i, x):  # a stacked stream (scanned layers) gets one key per layer
        k = jax.random.fold_in(key, i)
        return jax.random.split(k, x.shape) if x.shape else k

    fresh = [
        fresh_key(i, x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else jnp.zeros_like(x)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, fresh)


def _select(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _capture_sown(fn, model, *args):
    """``fn(model, *args)`` and the ``nnx.Intermediate`` values its layers sowed, as a State.

    ``nnx.capture`` collects them from flax 0.12.6 on (sowing outside it is deprecated in 0.12.8);
    older flax keeps sown values on the module, from where ``nnx.pop`` takes them.
    """
    if hasattr(nnx, "capture"):
        return nnx.capture(lambda m: fn(m, *args), nnx.Intermediate)(model)
    token = SOWING_WITHOUT_CAPTURE.set(True)
    try:
        out = fn(model, *args)
    finally:
        SOWING_WITHOUT_CAPTURE.reset(token)
    return out, nnx.pop(model, nnx.Intermediate)


def make_train_step(task, model_def: ModelDef, tx, seed: int):
    """The pure training step ``(state, batch) -> (state, metrics)``.

    One step: reseed dropout and (if configured) redraw FAVOR+ projections from
    ``fold_in(key(seed), step)``; loss and gradients w.r.t. ``params``; the optimizer update.
    A non-finite loss or gradient norm leaves params, optimizer state and carry unchanged and
    is counted (``nonfinite_count``, ``last_nonfinite_step``); the host decides whether to stop.
    """
    key = jax.random.key(seed)

    def train_step(state: TrainState, batch):
        step_key = jax.random.fold_in(jax.random.fold_in(key, 2), state.step)
        model = model_def.merge(state.params, state.rest, train=True)
        task.redraw_projections(model, jax.random.fold_in(step_key, 0), state.step)
        rest = _split(model)[3]
        carry = _none_if_empty(state.carry)

        def loss_fn(params):
            # Variables are created at this trace level (dropout mutates its RNG counter).
            rng_state = _reseeded(model_def.rng_state, jax.random.fold_in(step_key, 1))
            m = nnx.merge(model_def.train_graph, params, rng_state, rest)
            # Memory diagnostics sown by layers with FastWeightConfig(diagnostics=True).
            (loss, (sums, new_carry)), sown = _capture_sown(task.loss, m, batch, carry)
            return loss, (sums, new_carry, nnx.to_pure_dict(sown))

        (loss, (sums, new_carry, diagnostics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates, opt_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = TrainState(
            step=state.step + 1,
            params=_select(finite, params, state.params),
            rest=rest,
            opt_state=_select(finite, opt_state, state.opt_state),
            carry=() if new_carry is None else _select(finite, new_carry, state.carry),
            nonfinite_count=jnp.where(finite, 0, state.nonfinite_count + 1),
            last_nonfinite_step=jnp.where(finite, state.last_nonfinite_step, state.step),
        )
        metrics = {**sums, "step_loss": loss, "grad_norm": grad_norm, "finite": finite}
        if diagnostics:
            metrics["diagnostics"] = diagnostics
        return new_state, metrics

    return train_step


def scan_steps(train_step):
    """``(state, batches) -> (state, metrics)``: ``train_step`` over the leading axis of
    ``batches`` (one ``lax.scan``: several steps per jitted call); metrics stacked."""

    def train_steps(state: TrainState, batches):
        return jax.lax.scan(train_step, state, batches)

    return train_steps


def make_eval_step(task, model_def: ModelDef):
    """``(params, rest, batch, carry, index) -> (metric sums, carry)`` in eval mode (no
    dropout), for the batches of evaluation number ``index`` (``task.prepare_eval``)."""

    def eval_step(params, rest, batch, carry, index):
        model = model_def.merge(params, rest, train=False)
        task.prepare_eval(model, index)
        _, (sums, new_carry) = task.loss(model, batch, _none_if_empty(carry))
        return sums, () if new_carry is None else new_carry

    return eval_step
