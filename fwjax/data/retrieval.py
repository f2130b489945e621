"""The paper's synthetic associative retrieval tasks (Schlag et al., 2021, Sec. 6.1).

A sequence writes ``L`` (key, value) pairs drawn from ``N`` distinct key tokens and ``N`` distinct
value tokens; the model is then queried with keys of the sequence and must return their values.

* Setting 1 (:attr:`RetrievalSetting.CAPACITY`): ``L = N``; a random permutation of all keys is
  paired with a random permutation of all values. Tests how many associations a memory holds.
* Setting 2 (:attr:`RetrievalSetting.UPDATE`): ``L = 2N``; keys and values drawn uniformly with
  replacement; a queried key's target is the value at its **last** occurrence. Tests whether a
  memory can overwrite an association.

Batches are pure functions of ``(seed, index)`` (a NumPy generator seeded with both), so a data
position is one integer: resuming a run at step ``s`` replays exactly the batches it would have
seen, and evaluation sets are fixed by their own seed.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

from fwjax.validation import check_positive_ints


class RetrievalSetting(enum.Enum):
    """Which of the paper's two synthetic settings (see the module docstring)."""

    CAPACITY = 1
    UPDATE = 2


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """A synthetic retrieval task.

    Attributes:
      setting: CAPACITY (setting 1) or UPDATE (setting 2).
      num_keys: ``N`` distinct keys; also the number of distinct values.
      train_queries: queries per training sequence (1 in the paper).
      eval_max_queries: an evaluation sequence is queried at every unique key it contains, at
        most this many (200 in the paper).
      sequence_length: ``L`` in setting 2 (None: the paper's ``2N``); longer sequences hold
        more overwrites of the same ``N`` keys (used to probe the memory over many steps).
        Setting 1 writes every key once, so there it must be None or ``N``.
    """

    setting: RetrievalSetting
    num_keys: int
    train_queries: int = 1
    eval_max_queries: int = 200
    sequence_length: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "setting", RetrievalSetting(self.setting))
        check_positive_ints(
            num_keys=self.num_keys,
            train_queries=self.train_queries,
            eval_max_queries=self.eval_max_queries,
        )
        check_positive_ints(sequence_length=self.sequence_length, allow_none=True)
        if self.train_queries > self.num_keys:
            raise ValueError(f"{self.train_queries=} must be at most {self.num_keys=}")
        length = self.sequence_length
        if self.setting is RetrievalSetting.CAPACITY and length not in (None, self.num_keys):
            raise ValueError(
                f"setting 1 writes every key once: {self.sequence_length=} must be None or "
                f"{self.num_keys=}"
            )

    @property
    def num_values(self) -> int:
        return self.num_keys

    @property
    def length(self) -> int:
        """``L``: ``N`` in setting 1, ``2N`` (or ``sequence_length``) in setting 2."""
        if self.setting is RetrievalSetting.CAPACITY:
            return self.num_keys
        return 2 * self.num_keys if self.sequence_length is None else self.sequence_length

    def _sequences(self, rng: np.random.Generator, batch_size: int):
        n, length = self.num_keys, self.length
        if self.setting is RetrievalSetting.CAPACITY:
            keys = rng.permuted(np.tile(np.arange(n), (batch_size, 1)), axis=1)
            values = rng.permuted(np.tile(np.arange(n), (batch_size, 1)), axis=1)
        else:
            keys = rng.integers(0, n, (batch_size, length))
            values = rng.integers(0, n, (batch_size, length))
        # The value stored at each key: the last write wins (setting 1 writes each key once).
        # -1 marks keys absent from the sequence.
        table = np.full((batch_size, n), -1, np.int64)
        rows = np.repeat(np.arange(batch_size), length)
        table[rows, keys.reshape(-1)] = values.reshape(-1)  # later writes overwrite earlier ones
        return keys, values, table

    def batch(self, seed: int, index: int, batch_size: int, *, eval: bool = False) -> dict:
        """The batch at position ``index`` of the stream ``seed``.

        Training batches query ``train_queries`` distinct keys of each sequence, uniformly among
        those present. Evaluation batches (``eval=True``) query every unique key present, at most
        ``eval_max_queries`` of them, padding with ``mask = False``.

        Returns:
          ``dict(keys [B, L], values [B, L], queries [B, Q], targets [B, Q], mask [B, Q])``:
          int32 token ids, and a bool mask of the real queries.
        """
        rng = np.random.default_rng([seed, index, int(eval)])
        keys, values, table = self._sequences(rng, batch_size)
        present = table >= 0
        num_q = min(self.eval_max_queries, self.num_keys) if eval else self.train_queries
        # Random priorities, absent keys last: the first num_q are a uniform subset of the
        # present keys (all of them when fewer than num_q are present).
        priority = np.where(present, rng.random(table.shape), 2.0)
        queries = np.argsort(priority, axis=1)[:, :num_q]
        mask = np.take_along_axis(present, queries, axis=1)
        targets = np.where(mask, np.take_along_axis(table, queries, axis=1), 0)
        return dict(
            keys=keys.astype(np.int32),
            values=values.astype(np.int32),
            queries=queries.astype(np.int32),
            targets=targets.astype(np.int32),
            mask=mask,
        )


def retrieval_loss(predictions, targets, mask):
    """The paper's loss: ``½ ‖onehot(target) − ŷ‖²`` summed over values, averaged over queries.

    Predicting all zeros gives 0.5.

    Args:
      predictions: ``ŷ`` ``[B, Q, num_values]``.
      targets: value ids ``[B, Q]``.
      mask: bool ``[B, Q]``, the real queries.

    Returns:
      The scalar mean loss over the real queries.
    """
    onehot = jax.nn.one_hot(targets, predictions.shape[-1], dtype=predictions.dtype)
    per_query = 0.5 * jnp.sum((onehot - predictions) ** 2, axis=-1)
    mask = mask.astype(predictions.dtype)
    return jnp.sum(per_query * mask) / jnp.maximum(jnp.sum(mask), 1.0)
