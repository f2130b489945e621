"""Logical axis names of the fwjax layers' parameters and their default mapping to mesh axes.

Parameters are annotated with logical names (``nnx.with_partitioning``, never sharded when
created); shardings come later from Flax's logical-axis rules: inside
``nnx.logical_axis_rules(rules)``, ``nnx.get_named_sharding(state, mesh)`` maps each name through
``rules``. A host model with its own names composes by listing its rules beside
:func:`logical_axis_rules`::

    rules = (("batch", "data"), ("hidden", "model"), *fwjax.nn.logical_axis_rules("model"))
    with nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(nnx.state(host_model), mesh)

Flax keeps the last entry of a name that appears twice, and leaves a name without a rule as it
is (a mesh has no axis of that name, so ``NamedSharding`` then raises): every name of
:data:`AXIS_NAMES` needs a rule.
"""

from __future__ import annotations

from flax import nnx

EMBED = "embed"  # the model width d_model
HEADS = "heads"  # the attention heads (q, k, v and β projections, the output projection's input)
MLP = "mlp"  # the feed-forward width d_ff
VOCAB = "vocab"  # the vocabulary (token embedding rows, output projection columns)
LAYERS = "layers"  # the layer axis of scanned blocks' stacked variables (never split)
AXIS_NAMES = (EMBED, HEADS, MLP, VOCAB, LAYERS)


def logical(init, axes: tuple[str | None, ...]):
    """Annotates an initializer with logical axis names (:data:`AXIS_NAMES` or None).

    The names are metadata only (``eager_sharding=False``): a module builds the same with or
    without a mesh or rules in context, and shardings are derived later from the names.

    Args:
      init: an initializer ``(key, shape, dtype) -> array``.
      axes: one logical name (or None: never split) per parameter axis.

    Returns:
      The initializer, whose variables carry ``out_sharding=axes``.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def logical_axis_rules(
    model_axis: str | None = "model", *, embed_axis: str | None = None
) -> tuple[tuple[str, str | None], ...]:
    """The rules that map fwjax's logical names to mesh axes (tensor parallelism).

    Attention heads, the feed-forward width and the vocabulary are split over ``model_axis``;
    the model width over ``embed_axis`` (None: replicated, as Megatron-style tensor parallelism).

    Args:
      model_axis: the mesh axis of tensor parallelism, or None to replicate every parameter.
      embed_axis: the mesh axis of ``embed`` (e.g. an FSDP axis), or None.

    Returns:
      ``((logical name, mesh axis or None), ...)`` for ``nnx.logical_axis_rules``.
    """
    return (
        (EMBED, embed_axis),
        (HEADS, model_axis),
        (MLP, model_axis),
        (VOCAB, model_axis),
        (LAYERS, None),
    )
