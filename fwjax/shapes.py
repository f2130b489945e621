"""Shape legend and jaxtyping aliases used across fwjax.

Dimension names (used in every docstring and annotation):

====  ======================================================================
B     batch size
T     sequence length (time)
S     key/value length of softmax attention (``S = T`` for self-attention)
H     number of heads
K     key (feature) dimension of the fast weight memory, after the feature map
V     value dimension
D     raw head dimension, before a feature map
M     number of random features (FAVOR+)
C     chunk size of the chunkwise-parallel form
N     number of chunks, ``ceil(T / C)``
====  ======================================================================

Inputs are batch-major and time-major within a batch: ``[B, T, H, D]``. The fast weight
state is one ``[K, V]`` matrix per batch element and head: ``[B, H, K, V]`` (row convention:
``S_t = S_{t-1} + k_t u_tᵀ``, reads are ``S_tᵀ q_t``).
"""

from jaxtyping import Array, Float, Int, Real

Queries = Float[Array, "B T H K"]
Keys = Float[Array, "B T H K"]
Values = Float[Array, "B T H V"]
Outputs = Float[Array, "B T H V"]
Beta = Float[Array, "B T H"]
Alpha = Float[Array, "B T H"]
State = Float[Array, "B H K V"]
Normalizer = Float[Array, "B H K"]
RawHeads = Float[Array, "B T H D"]
Features = Float[Array, "*batch K"]
Projection = Float[Array, "D M"]
SoftmaxKeys = Float[Array, "B S H D"]
SoftmaxValues = Float[Array, "B S H V"]
# Document ids of packed rows: equal within a document (fwjax.ops.segments).
SegmentIds = Int[Array, "B T"]
RawFeatures = Float[Array, "*batch D"]
# An output scale: a Python number, a scalar array (a traced argument under jit), or None.
Scale = float | Real[Array, ""] | None

__all__ = [
    "Alpha",
    "Beta",
    "Features",
    "Keys",
    "Normalizer",
    "Outputs",
    "Projection",
    "Queries",
    "RawFeatures",
    "RawHeads",
    "Scale",
    "SegmentIds",
    "SoftmaxKeys",
    "SoftmaxValues",
    "State",
    "Values",
]
