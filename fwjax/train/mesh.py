"""The device mesh, logical-axis sharding rules, and batch placement across processes.

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (tensor parallelism:
attention heads and feed-forward width are split over it). Parameters carry logical axis names
from :mod:`fwjax.nn.partitioning` (``embed``, ``heads``, ``mlp``, ``vocab``), mapped to mesh axes
by Flax's logical-axis rules (``nnx.logical_axis_rules``): fwjax's defaults
(:func:`fwjax.nn.logical_axis_rules` over ``model``), overridden by rules of the same names in
context. Unannotated parameters (norms, biases, the retrieval model) are replicated.
"""

from __future__ import annotations

import dataclasses

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


def config_rules(config: MeshConfig) -> tuple[tuple[str, str | None], ...]:
    """fwjax's logical-axis rules for a mesh config: tensor parallelism over ``model``, and
    with ``fsdp`` the model width (``embed``) over ``data``."""
    return logical_axis_rules(MODEL, embed_axis=DATA if config.fsdp else None)


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


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """A process's share of every global batch: processes feed contiguous, equal shares, rows
    ``[index·B/count, (index+1)·B/count)`` of a batch of ``B`` rows.

    Attributes:
      index: this process (``jax.process_index()``).
      count: the processes (``jax.process_count()``); 1: the whole batch.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"index={self.index} must be in [0, count={self.count})")

    def of(self, global_rows: int) -> slice:
        """The rows of a global batch of ``global_rows`` rows (divisible by ``count``)."""
        if global_rows % self.count:
            raise ValueError(f"{global_rows=} rows do not split over {self.count} processes")
        per = global_rows // self.count
        return slice(self.index * per, (self.index + 1) * per)

    def take(self, batch: dict) -> dict:
        """This process's rows of a global host batch (for data generated whole)."""
        return {k: v[self.of(len(v))] for k, v in batch.items()}


ALL_ROWS = ProcessRows()


def process_rows() -> ProcessRows:
    """This process's :class:`ProcessRows`."""
    return ProcessRows(jax.process_index(), jax.process_count())


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Places this process's rows of a global batch on the mesh, split over ``data``.

    Every process reads only its own rows (:func:`process_rows`; the tasks' ``train_batch`` /
    ``eval_data`` take them), and the global array is assembled from the processes' shares
    (``jax.make_array_from_process_local_data``).
    """
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            out[name] = jax.device_put(x, sharding)
        else:
            shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out
