"""The device mesh, logical-axis sharding rules, and batch placement across processes.

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (tensor parallelism:
attention heads and feed-forward width are split over it). Parameters carry logical axis names
from :mod:`fwjax.nn.partitioning` (``embed``, ``heads``, ``mlp``, ``vocab``), mapped to mesh axes
by Flax's logical-axis rules (``nnx.logical_axis_rules``): fwjax's defaults
(:func:`fwjax.nn.logical_axis_rules` over ``model``), overridden by rules of the same names in
context. Unannotated parameters (norms, biases, the retrieval model) are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fwjax.nn.partitioning import logical_axis_rules
from fwjax.train.config import MeshConfig

DATA, MODEL = "data", "model"


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (all devices of all processes by default).

    Raises:
      ValueError: when ``data · model`` does not match the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if n % config.model:
        raise ValueError(f"mesh model={config.model} must divide the {n} devices")
    data = n // config.model if config.data == -1 else config.data
    if data * config.model != n:
        raise ValueError(f"mesh data={data} × model={config.model} must equal the {n} devices")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (data, config.model), (DATA, MODEL), axis_types=axis_types, devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """A global batch must split evenly over the data axis and over the processes."""
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(
            f"global batch_size={batch_size} must be divisible by the mesh's data={dp}"
        )
    if batch_size % jax.process_count():
        raise ValueError(
            f"global batch_size={batch_size} must be divisible by "
            f"process_count={jax.process_count()}"
        )


def active_rules(defaults=None) -> tuple[tuple[str, str | None], ...]:
    """The logical-axis rules in force: ``defaults`` (fwjax's, over ``model``, when None)
    with the rules of the enclosing ``nnx.logical_axis_rules`` context taking precedence for
    the names they map.

    Returns:
      ``((logical name, mesh axis or None), ...)``, one entry per name.
    """
    defaults = logical_axis_rules(MODEL) if defaults is None else defaults
    return tuple(dict((*defaults, *spmd.get_logical_axis_rules())).items())


def state_shardings(mesh: Mesh, abstract_state, rules=None) -> object:
    """Shardings for a state pytree (``nnx.get_named_sharding`` under :func:`active_rules`).

    Variables annotated by ``nnx.with_partitioning`` are split as their logical names map;
    other arrays are replicated.

    Args:
      mesh: the device mesh.
      abstract_state: a pytree of ``nnx.Variable`` s and arrays (or ``ShapeDtypeStruct`` s).
      rules: default logical-axis rules (None: fwjax's, :func:`fwjax.nn.logical_axis_rules`).

    Returns:
      The same pytree with a ``NamedSharding`` per array.
    """
    with nnx.logical_axis_rules(active_rules(rules)):
        return nnx.get_named_sharding(abstract_state, mesh)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch (processes feed contiguous, equal shares)."""
    per = global_batch_size // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Places a global host batch on the mesh, split over ``data``.

    Every process computes the same global batch (batches are pure functions of the step) and
    contributes only its own rows, so multi-host runs read each example once per step.
    """
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            out[name] = jax.device_put(x, sharding)
        else:
            local = x[process_slice(x.shape[0])]
            out[name] = jax.make_array_from_process_local_data(sharding, local, x.shape)
    return out
