"""State tracking: a running sum modulo ``m`` (parity for ``m = 2``), a task where the delta rule's
transition matters (Grazzi et al., 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues"; Siems et al., 2025, "DeltaProduct").

A sequence of ``T`` random digits ``x_t ∈ {0, …, m−1}``; at every position the model predicts
``y_t = (x_1 + … + x_t) mod m``. A linear RNN whose transitions have only non-negative real
eigenvalues (the delta rule with ``β ∈ [0, 1]``) cannot track parity at arbitrary length; one
with reflections (``β`` up to 2) can, and counting modulo ``m > 2`` needs rotations, i.e.
products of at least two reflections (DeltaProduct with ``N ≥ 2``).

The batches have the interface of :mod:`fwjax.data.recall` (``tokens``, ``targets``, ``mask``,
``hops``), so the recall task trains and scores them: every position is scored, and ``hops``
holds the quarter of the sequence a position falls in (1–4), so the per-"hop" accuracies of
the recall metrics are the accuracies of the four quarters (the last one: the longest sums).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fwjax.validation import check_ints

QUARTERS = 4


@dataclasses.dataclass(frozen=True)
class ModularSumTask:
    """The running sum modulo ``modulus`` of ``length`` random digits.

    Attributes:
      modulus: ``m`` (2: parity).
      length: ``T``.

    Token ids: the digits ``0 … m−1`` (targets use the same ids); ``vocab_size = m``.
    """

    modulus: int = 2
    length: int = 64

    max_hops = QUARTERS  # the recall metrics' buckets: quarters of the sequence

    def __post_init__(self):
        check_ints(minimum=2, modulus=self.modulus)
        check_ints(minimum=QUARTERS, length=self.length)

    @property
    def vocab_size(self) -> int:
        return self.modulus

    def batch(self, seed: int, index: int, batch_size: int, *, eval: bool = False) -> dict:
        """The batch at position ``index`` of the stream ``seed`` (``eval``: a disjoint stream).

        Returns:
          ``dict(tokens, targets, mask, hops)``, each ``[B, T]``: int32 digits, int32 running
          sums modulo ``m``, an all-True mask, and the quarter (1–4) of each position.
        """
        rng = np.random.default_rng([seed, index, int(eval), self.modulus])
        tokens = rng.integers(0, self.modulus, (batch_size, self.length))
        targets = np.cumsum(tokens, axis=1) % self.modulus
        quarter = 1 + (np.arange(self.length) * QUARTERS) // self.length
        return dict(
            tokens=tokens.astype(np.int32),
            targets=targets.astype(np.int32),
            mask=np.ones((batch_size, self.length), bool),
            hops=np.broadcast_to(quarter, (batch_size, self.length)).astype(np.int32),
        )
