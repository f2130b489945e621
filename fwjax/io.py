"""Model weights as safetensors files: save, load, and a params-only export of a training run.

A file holds one tensor per model variable, named by its NNX path joined with ``/`` (e.g.
``blocks/0/attention/qkvb/kernel``, ``embed/embedding``), in the variable's own dtype (bfloat16
included). Random-number streams are never stored. The header's string metadata holds:

==================  ====================================================================
``format``          ``fwjax.params``
``fwjax_version``   :data:`fwjax.__version__` of the writer
``variables``       JSON ``{name: variable type}`` (``Param``, or e.g. ``FavorProjection``)
``config``          JSON of the model's or run's config, when one was given
``step``            the training step (exports of a workdir)
==================  ====================================================================

::

    save_params("model.safetensors", model, config=model_config)
    load_params("model.safetensors", model)      # into a model built with the same config

``fwjax export --workdir W OUT.safetensors`` (:func:`export_workdir`) writes the latest
checkpoint's model variables (parameters and non-trainable arrays such as FAVOR+ projections;
no optimizer state, no carried memory) with the run's config, readable without Orbax, JAX or
fwjax (``safetensors.numpy.load_file``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import fwjax

FORMAT = "fwjax.params"


def _path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _value(variable) -> Any:
    return variable.get_value() if isinstance(variable, nnx.Variable) else variable


def _host_array(name: str, value) -> np.ndarray:
    if isinstance(value, jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            raise TypeError(f"{name!r} holds random keys, which are not stored")
        if not value.is_fully_addressable:
            raise ValueError(f"{name!r} is not fully addressable from this process")
    return np.ascontiguousarray(np.asarray(jax.device_get(value)))


def flatten_variables(tree) -> dict[str, tuple[np.ndarray, str]]:
    """The arrays of a model or state, named by their ``/``-joined NNX paths.

    Args:
      tree: an ``nnx.Module`` (all its variables except random-number streams) or an
        ``nnx.State`` (all its variables).

    Returns:
      ``{name: (host array, variable type name)}`` in path order.
    """
    state = nnx.state(tree, nnx.Not(nnx.RngState)) if isinstance(tree, nnx.Module) else tree
    out = {}
    for path, variable in nnx.to_flat_state(state):
        name = _path_name(path)
        kind = type(variable).__name__ if isinstance(variable, nnx.Variable) else "Param"
        out[name] = (_host_array(name, _value(variable)), kind)
    return out


def _config_json(config) -> str:
    if isinstance(config, str):
        json.loads(config)  # must already be JSON
        return config
    from fwjax.train.config_io import unstructure

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = unstructure(config)
    return json.dumps(config, sort_keys=True)


def save_params(
    path: str | Path,
    params,
    *,
    config=None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a model's variables (or a state) to a safetensors file.

    Args:
      path: the file to write (parent folders are created).
      params: an ``nnx.Module`` (every variable but random-number streams), or an
        ``nnx.State`` such as ``nnx.state(model, nnx.Param)``.
      config: the config that builds the model (a config dataclass, a JSON-ready dict or a
        JSON string), stored as JSON in the ``config`` metadata field; optional.
      metadata: further string fields for the header (may not replace the ones above).

    Returns:
      The path written.
    """
    tensors = flatten_variables(params)
    if not tensors:
        raise ValueError(f"{type(params).__name__} holds no variables to save")
    header = {
        "format": FORMAT,
        "fwjax_version": fwjax.__version__,
        "variables": json.dumps({k: kind for k, (_, kind) in tensors.items()}),
    }
    if config is not None:
        header["config"] = _config_json(config)
    for key, value in (metadata or {}).items():
        if key in header:
            raise ValueError(f"metadata key {key!r} is reserved")
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}]={value!r} must be a string")
        header[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: array for k, (array, _) in tensors.items()}, str(path), metadata=header)
    return path


def read_params(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file as NumPy arrays.

    Args:
      path: a file written by :func:`save_params` (or any safetensors file).

    Returns:
      ``(tensors, metadata)``: ``{name: array}`` in the stored dtypes, and the header's
      string metadata (empty if there is none).
    """
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        names = f.keys()
        tensors = {name: f.get_tensor(name) for name in names}
    return tensors, metadata


def load_params(path: str | Path, model: nnx.Module, *, cast: bool = False) -> dict[str, str]:
    """Loads a file written by :func:`save_params` into ``model`` in place.

    Every name in the file must be a variable of ``model`` with the same shape (and dtype,
    unless ``cast``), and every ``nnx.Param`` of ``model`` must be in the file; other
    variables absent from the file (e.g. a FAVOR+ projection in a params-only file) keep
    their values.

    Args:
      path: the safetensors file.
      model: a model built with the config the file was saved from.
      cast: convert stored arrays to the model's dtypes instead of refusing a difference.

    Returns:
      The file's metadata.

    Raises:
      ValueError: names missing or unexpected, or a shape/dtype differs (all named).
    """
    tensors, metadata = read_params(path)
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))))
    names = {_path_name(p): v for p, v in flat}
    unexpected = sorted(set(tensors) - set(names))
    missing = sorted(
        n for n, v in names.items() if isinstance(v, nnx.Param) and n not in tensors
    )
    if unexpected or missing:
        raise ValueError(
            f"{str(path)!r} does not fit the model: unexpected {unexpected}, missing {missing}"
        )
    updated = []
    for p, variable in flat:
        name = _path_name(p)
        if name not in tensors:
            continue
        current, stored = _value(variable), tensors[name]
        if stored.shape != current.shape:
            raise ValueError(f"{name!r}: stored shape {stored.shape} != model's {current.shape}")
        if stored.dtype != current.dtype and not cast:
            raise ValueError(
                f"{name!r}: stored dtype {stored.dtype} != model's {current.dtype} "
                "(pass cast=True to convert)"
            )
        array = jax.numpy.asarray(stored, dtype=current.dtype)
        sharding = getattr(current, "sharding", None)
        if sharding is not None:
            array = jax.device_put(array, sharding)
        updated.append((p, variable.replace(array)))
    nnx.update(model, nnx.from_flat_state(updated))
    return metadata


def export_workdir(workdir: str | Path, out: str | Path) -> Path:
    """Writes the model variables of a training workdir's latest checkpoint to safetensors.

    Parameters and non-trainable model arrays (FAVOR+ projections) are written; the optimizer
    state, the carried memory and the random-number streams are not. The header holds the
    run's resolved config (``config``, the same JSON as ``workdir/config.json``) and ``step``.

    Args:
      workdir: a folder written by ``fwjax train``.
      out: the safetensors file to write.

    Returns:
      ``out``.

    Raises:
      FileNotFoundError: ``workdir`` is not a training workdir or has no checkpoint.
    """
    from fwjax.train.loop import Run

    run = Run.restore(workdir)
    run.checkpointer.close()
    merged = nnx.merge_state(run.state.params, run.state.rest)
    return save_params(
        out, merged, config=run.config, metadata={"step": str(run.restored_step)}
    )
