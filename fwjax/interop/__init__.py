"""Weights from other libraries: :mod:`fwjax.interop.fla` converts flash-linear-attention's
DeltaNet layers into :class:`~fwjax.nn.FastWeightAttention`. Nothing here imports PyTorch."""
