"""Deprecated alias of the chunking helpers, which live in :mod:`fwjax.ops.common`."""

import warnings

from fwjax.ops.common import causal_mask, from_chunks, num_chunks, to_chunks

warnings.warn(
    "fwjax.ops.chunking is deprecated; import from fwjax.ops.common", DeprecationWarning, 2
)

__all__ = ["causal_mask", "from_chunks", "num_chunks", "to_chunks"]
