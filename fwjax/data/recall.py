"""Harder associative recall tasks for causal language models: MQAR and multi-hop recall.

Both tasks write (key, value) pairs into a token stream, interleave distractor tokens that are
never queried, then ask many queries after a separator; a causal LM must emit the answer at the
position of each query (the next token), and only those positions are scored.

* :class:`MQARTask`: multi-query associative recall (Zoology; Arora et al., 2023,
  arXiv:2312.04927). ``P`` distinct keys with random values; queries are a random subset of the
  written keys in random order; the target of a query is its key's value.
* :class:`MultiHopTask`: the pairs form chains over one entity vocabulary,
  ``e₀ → e₁ → … → e_L`` (``eⱼ₊₁ = f(eⱼ)``), with a fresh random assignment of entities to chain
  positions in every sequence, so ``f`` can only be followed through the written pairs. A query
  ``HOP_h e`` asks for ``fʰ(e)``, the ``h``-hop successor (a compositional lookup).

Token layout (disjoint ranges, the same in both tasks; ``vocab_size`` is their total)::

    0                 PAD (unused by the generators; free for padding)
    1                 SEP: the end of the context, the queries follow
    2 … 1+H           HOP_1 … HOP_H (multi-hop only; H = max_hops, 0 for MQAR)
    key range         MQAR: key ids; multi-hop: entity e in the *subject* role (left of a pair)
    value range       MQAR: value ids; multi-hop: entity e in the *object* role (right of a pair)
    noise range       distractor tokens

In the multi-hop task an entity has two token ids, ``key_offset + e`` and ``value_offset + e``,
one per role: a pair's role is readable from its tokens alone (as in MQAR), however the
distractors shift pair boundaries, and a model has to learn the fixed correspondence between the
two ids of an entity to follow a chain. With ``max_hops = 1`` it is MQAR without repeated values.

Sequences (``k``/``v`` a pair, ``n`` a distractor, ``·`` an answer position)::

    MQAR:       k v n k v k v n … SEP k· v k· v …             length 2P + D + 1 + 2Q
    multi-hop:  k v n k v k v n … SEP HOP_h k· v HOP_h k· v …  length 2P + D + 1 + 3Q

Distractors sit between pairs at uniformly random places. Queries carry their answers (teacher
forcing), so a model may see earlier answers but never its own before it is predicted.

Batches are pure functions of ``(seed, index, eval)`` (a NumPy generator seeded with all three),
as in :mod:`fwjax.data.retrieval`: training resumes at a step by replaying its index, and an
evaluation set is fixed by its seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fwjax.validation import check_ints

PAD = 0
SEP = 1
FIRST_HOP = 2  # token id of HOP_1


def _complete_and_check(task, **sizes) -> None:
    """A recall task's common checks: ``num_queries`` None becomes ``num_pairs``; ``sizes``,
    ``num_queries`` and ``num_noise`` must be positive ints, ``num_distractors`` non-negative."""
    if task.num_queries is None:
        object.__setattr__(task, "num_queries", task.num_pairs)
    check_ints(minimum=1, **sizes, num_queries=task.num_queries, num_noise=task.num_noise)
    check_ints(minimum=0, num_distractors=task.num_distractors)


def _random_subsets(rng: np.random.Generator, batch: int, population: int, size: int):
    """``[batch, size]``: per row, ``size`` distinct values of ``range(population)`` in random
    order (the first ``size`` entries of a uniform random permutation)."""
    return rng.permuted(np.tile(np.arange(population), (batch, 1)), axis=1)[:, :size]


def _write_context(
    rng: np.random.Generator, keys: np.ndarray, values: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """Lays out pairs and distractors: ``[B, 2P + D]`` tokens.

    Args:
      rng: the batch's generator.
      keys, values: token ids ``[B, P]``; pair ``i`` is written as ``keys[:, i] values[:, i]``,
        pairs in index order.
      noise: distractor token ids ``[B, D]``.

    Returns:
      The context tokens: the ``P`` pairs (2 tokens each) and ``D`` distractors (1 token each)
      in a random interleaving that keeps the pairs in order and never splits one.
    """
    b, p = keys.shape
    d = noise.shape[1]
    # One "unit" per pair or distractor; a random arrangement of P pair units and D noise units.
    is_noise = rng.permuted(np.tile(np.arange(p + d) >= p, (b, 1)), axis=1)
    width = np.where(is_noise, 1, 2)
    start = np.cumsum(width, axis=1) - width  # first token of each unit
    pair_index = np.cumsum(~is_noise, axis=1) - 1  # the pair a pair unit holds
    noise_index = np.cumsum(is_noise, axis=1) - 1  # the distractor a noise unit holds
    rows = np.broadcast_to(np.arange(b)[:, None], is_noise.shape)
    tokens = np.full((b, 2 * p + d), PAD, np.int64)
    pr, ps, pi = rows[~is_noise], start[~is_noise], pair_index[~is_noise]
    tokens[pr, ps] = keys[pr, pi]
    tokens[pr, ps + 1] = values[pr, pi]
    nr = rows[is_noise]
    tokens[nr, start[is_noise]] = noise[nr, noise_index[is_noise]]
    return tokens


class _TokenLayout:
    """The token ranges and lengths both tasks share (the layout in the module docstring).

    A task defines ``num_pairs``, ``num_queries``, ``num_distractors``, ``num_noise`` and the
    four layout sizes below; this class derives the offsets of the ranges and the lengths.
    """

    _hop_tokens: int  # HOP_1 … HOP_H tokens after SEP
    _key_range: int
    _value_range: int
    _query_width: int  # tokens per query, answer included

    @property
    def key_offset(self) -> int:
        return FIRST_HOP + self._hop_tokens

    @property
    def value_offset(self) -> int:
        return self.key_offset + self._key_range

    @property
    def noise_offset(self) -> int:
        return self.value_offset + self._value_range

    @property
    def vocab_size(self) -> int:
        return self.noise_offset + self.num_noise

    @property
    def context_length(self) -> int:
        """Tokens before SEP: ``2P + D``."""
        return 2 * self.num_pairs + self.num_distractors

    @property
    def length(self) -> int:
        """Sequence length ``T = 2P + D + 1 + wQ`` (``w`` tokens per query)."""
        return self.context_length + 1 + self._query_width * self.num_queries


@dataclasses.dataclass(frozen=True)
class MQARTask(_TokenLayout):
    """Multi-query associative recall with distractors (Zoology's MQAR).

    Attributes:
      num_pairs: ``P`` key-value pairs per sequence, with distinct keys.
      num_queries: ``Q`` queries, distinct written keys in random order; None means ``P``.
      num_distractors: ``D`` noise tokens interleaved with the pairs (never queried).
      num_keys: size of the key range (``>= P``).
      num_values: size of the value range (values are drawn uniformly with replacement).
      num_noise: size of the distractor range.

    Shapes: every batch array is ``[B, T]`` with ``T = length = 2P + D + 1 + 2Q``.
    """

    num_pairs: int
    num_queries: int | None = None
    num_distractors: int = 0
    num_keys: int = 64
    num_values: int = 64
    num_noise: int = 16

    def __post_init__(self):
        _complete_and_check(
            self, num_pairs=self.num_pairs, num_keys=self.num_keys, num_values=self.num_values
        )
        if self.num_pairs > self.num_keys:
            raise ValueError(f"{self.num_pairs=} must be <= {self.num_keys=} (distinct keys)")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"{self.num_queries=} must be <= {self.num_pairs=} (distinct keys)")

    max_hops = 1  # no hop tokens; every answer is a 1-hop lookup
    _hop_tokens = 0
    _query_width = 2  # key, value

    @property
    def _key_range(self) -> int:
        return self.num_keys

    @property
    def _value_range(self) -> int:
        return self.num_values

    def batch(self, seed: int, index: int, batch_size: int, *, eval: bool = False) -> dict:
        """The batch at position ``index`` of the stream ``seed`` (``eval`` selects a disjoint
        stream of the same distribution).

        Args:
          seed, index: the stream and position; the batch is a pure function of them.
          batch_size: ``B``.
          eval: draw from the evaluation stream.

        Returns:
          ``dict(tokens, targets, mask, hops)``, each ``[B, T]``: int32 input token ids; int32
          target ids (the value of the queried key at answer positions, PAD elsewhere); a bool
          mask of the answer positions; int32 hop counts (1 at answers, 0 elsewhere).
        """
        rng = np.random.default_rng([seed, index, int(eval)])
        b, p, q = batch_size, self.num_pairs, self.num_queries
        keys = _random_subsets(rng, b, self.num_keys, p) + self.key_offset
        values = rng.integers(0, self.num_values, (b, p)) + self.value_offset
        noise = rng.integers(0, self.num_noise, (b, self.num_distractors)) + self.noise_offset
        context = _write_context(rng, keys, values, noise)
        # Queries: Q distinct pairs in random order, written "key value" after SEP.
        asked = _random_subsets(rng, b, p, q)
        query_keys = np.take_along_axis(keys, asked, axis=1)
        answers = np.take_along_axis(values, asked, axis=1)
        queries = np.stack([query_keys, answers], axis=2).reshape(b, 2 * q)
        tokens = np.concatenate([context, np.full((b, 1), SEP), queries], axis=1)
        # The answer to a query is predicted at its key's position (the next token is the value).
        answer_pos = self.context_length + 1 + 2 * np.arange(q)
        return _outputs(tokens, answer_pos, answers, np.ones((b, q), np.int64))


def _outputs(tokens, answer_pos, answers, hops) -> dict:
    b, t = tokens.shape
    targets = np.full((b, t), PAD, np.int64)
    targets[:, answer_pos] = answers
    mask = np.zeros((b, t), bool)
    mask[:, answer_pos] = True
    hop = np.zeros((b, t), np.int64)
    hop[:, answer_pos] = hops
    return dict(
        tokens=tokens.astype(np.int32),
        targets=targets.astype(np.int32),
        mask=mask,
        hops=hop.astype(np.int32),
    )


@dataclasses.dataclass(frozen=True)
class MultiHopTask(_TokenLayout):
    """Multi-hop recall: follow ``key → value → key`` chains of written pairs.

    Each sequence draws ``C · (L + 1)`` distinct entities (``C`` chains of ``L + 1`` entities,
    a random relabelling per sequence) and writes the ``C · L`` links ``(eⱼ, eⱼ₊₁)`` as pairs
    in random order, with distractors between them. A query ``HOP_h e`` names a hop count
    ``h`` (uniform in ``1..max_hops``) and an entity ``e`` at a chain position with an
    ``h``-hop successor (uniform among them); its target is ``fʰ(e)`` in the value range.

    Attributes:
      num_chains: ``C``.
      chain_length: ``L``, links per chain (``>= max_hops``).
      max_hops: ``H``.
      num_queries: ``Q`` queries per sequence, drawn independently (repeats possible).
      num_distractors: ``D`` noise tokens interleaved with the pairs.
      num_entities: entity vocabulary (``>= C · (L + 1)``).
      num_noise: size of the distractor range.
      one_hop_steps: training batches with an index below this score only their 1-hop answers
        (a curriculum: the other queries stay in the sequence, unscored: mask False, target
        PAD, hop 0); evaluation batches score every query.

    Shapes: every batch array is ``[B, T]`` with ``T = length = 2CL + D + 1 + 3Q``.
    """

    num_chains: int
    chain_length: int = 2
    max_hops: int = 2
    num_queries: int | None = None
    num_distractors: int = 0
    num_entities: int = 64
    num_noise: int = 16
    one_hop_steps: int = 0

    def __post_init__(self):
        _complete_and_check(
            self,
            num_chains=self.num_chains,
            chain_length=self.chain_length,
            max_hops=self.max_hops,
            num_entities=self.num_entities,
        )
        check_ints(minimum=0, one_hop_steps=self.one_hop_steps)
        if self.max_hops > self.chain_length:
            raise ValueError(f"{self.max_hops=} must be <= {self.chain_length=}")
        needed = self.num_chains * (self.chain_length + 1)
        if needed > self.num_entities:
            raise ValueError(
                f"{self.num_chains=} chains of {self.chain_length=} links need {needed} distinct "
                f"entities; {self.num_entities=}"
            )

    @property
    def num_pairs(self) -> int:
        """``P = C · L`` written links."""
        return self.num_chains * self.chain_length

    _query_width = 3  # HOP_h, entity, answer

    @property
    def _hop_tokens(self) -> int:
        return self.max_hops

    @property
    def _key_range(self) -> int:
        return self.num_entities

    @property
    def _value_range(self) -> int:
        return self.num_entities

    def batch(self, seed: int, index: int, batch_size: int, *, eval: bool = False) -> dict:
        """The batch at position ``index`` of the stream ``seed`` (see :meth:`MQARTask.batch`).

        Returns:
          ``dict(tokens, targets, mask, hops)``, each ``[B, T]``: int32 input token ids; int32
          targets (``value_offset + fʰ(e)`` at answer positions, PAD elsewhere); a bool mask of
          the answer positions; int32 hop counts ``h`` at answers, 0 elsewhere.
        """
        rng = np.random.default_rng([seed, index, int(eval)])
        b, c, n, q = batch_size, self.num_chains, self.chain_length, self.num_queries
        # Random relabelling: chain i is entities[:, i, 0] → entities[:, i, 1] → … (fresh per row).
        entities = _random_subsets(rng, b, self.num_entities, c * (n + 1)).reshape(b, c, n + 1)
        # The C·L links, written in a random order.
        heads = entities[:, :, :-1].reshape(b, c * n)
        tails = entities[:, :, 1:].reshape(b, c * n)
        order = _random_subsets(rng, b, c * n, c * n)
        keys = np.take_along_axis(heads, order, axis=1) + self.key_offset
        values = np.take_along_axis(tails, order, axis=1) + self.value_offset
        noise = rng.integers(0, self.num_noise, (b, self.num_distractors)) + self.noise_offset
        context = _write_context(rng, keys, values, noise)
        # Queries: hop h, chain, then a start position j in 0..L−h, so that j + h <= L.
        hops = rng.integers(1, self.max_hops + 1, (b, q))
        chain = rng.integers(0, c, (b, q))
        start = (rng.random((b, q)) * (n - hops + 1)).astype(np.int64)
        rows = np.arange(b)[:, None]
        query_entity = entities[rows, chain, start]
        answer_entity = entities[rows, chain, start + hops]
        answers = answer_entity + self.value_offset
        queries = np.stack(
            [hops - 1 + FIRST_HOP, query_entity + self.key_offset, answers], axis=2
        ).reshape(b, 3 * q)
        tokens = np.concatenate([context, np.full((b, 1), SEP), queries], axis=1)
        # Predicted at the entity's position (after its hop token; the answer follows).
        answer_pos = self.context_length + 1 + 3 * np.arange(q) + 1
        out = _outputs(tokens, answer_pos, answers, hops)
        if not eval and index < self.one_hop_steps:  # the curriculum: 1-hop answers only
            scored = out["mask"] & (out["hops"] == 1)
            out["mask"] = scored
            out["targets"] = np.where(scored, out["targets"], PAD).astype(np.int32)
            out["hops"] = np.where(scored, out["hops"], 0).astype(np.int32)
        return out


@dataclasses.dataclass(frozen=True)
class ZoologyMQARTask:
    """MQAR exactly as Zoology generates it (``zoology/data/multiquery_ar.py``, Arora et al.,
    2023): the protocol of the published MQAR grids.

    A sequence of ``length`` tokens starts with ``P`` key-value pairs (keys drawn without
    replacement from ``1 … V/2 − 1``, values from ``V/2 … V − 1``); each key is then queried
    once, at a position after the pairs drawn from a power law over the gaps (``power_a``;
    small gaps likely), and the value is predicted at the query's position. Every other token
    is random (``random_non_queries``, any id in ``0 … V − 1``, as in Zoology) or 0.

    Attributes:
      vocab_size: ``V`` (Zoology: 8192).
      length: ``T`` (even, ``4P <= T < V``).
      num_pairs: ``P``.
      power_a: the power law's exponent (Zoology's default 0.01).
      random_non_queries: fill the non-query positions with random tokens.

    Differences from Zoology's code: batches are drawn from a NumPy ``Generator`` seeded by
    ``(seed, index, eval)`` (Zoology draws fixed train and test sets with the global seed), and
    the query gaps are sampled without replacement by Gumbel top-``P`` (the same distribution
    as ``numpy.random.choice(replace=False, p=...)``).
    """

    vocab_size: int = 8192
    length: int = 64
    num_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True

    max_hops = 1

    def __post_init__(self):
        check_ints(minimum=1, num_pairs=self.num_pairs)
        check_ints(minimum=2, length=self.length, vocab_size=self.vocab_size)
        if self.length % 2:
            raise ValueError(f"{self.length=} must be even (Zoology's layout)")
        if 4 * self.num_pairs > self.length:
            raise ValueError(f"{self.num_pairs=} needs length >= 4 · num_pairs; got {self.length=}")
        if self.vocab_size <= self.length:
            raise ValueError(f"{self.vocab_size=} must exceed {self.length=}")
        if self.num_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"{self.num_pairs=} distinct keys need vocab_size > 2 · (P + 1)")
        if not self.power_a > 0:
            raise ValueError(f"{self.power_a=} must be > 0")

    def batch(self, seed: int, index: int, batch_size: int, *, eval: bool = False) -> dict:
        """The batch at position ``index`` of the stream ``seed`` (``eval``: a disjoint stream).

        Returns:
          ``dict(tokens, targets, mask, hops)``, each ``[B, T]`` (the interface of
          :class:`MQARTask`): the answer of each query is predicted at the query key.
        """
        rng = np.random.default_rng([seed, index, int(eval), 1])
        b, p, t, v = batch_size, self.num_pairs, self.length, self.vocab_size
        half = v // 2
        keys = _random_subsets(rng, b, half - 1, p) + 1
        values = _random_subsets(rng, b, v - half, p) + half
        context = np.stack([keys, values], axis=2).reshape(b, 2 * p)
        # The query gaps: P distinct slots of (T − 2P) / 2, power-law weights (Gumbel top-P).
        space = (t - 2 * p) // 2
        weights = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        scores = np.log(weights / weights.sum()) + rng.gumbel(size=(b, space))
        gaps = np.argsort(-scores, axis=1)[:, :p]
        rest = np.zeros((b, t - 2 * p + 1), np.int64)
        np.put_along_axis(rest, 2 * gaps, keys, axis=1)
        examples = np.concatenate([context, rest], axis=1)  # [B, T + 1]
        labels = np.full((b, t + 1), -1, np.int64)
        np.put_along_axis(labels, 2 * gaps + 2 * p + 1, values, axis=1)
        tokens, labels = examples[:, :-1], labels[:, 1:]
        if self.random_non_queries:
            noise = rng.integers(0, v, tokens.shape)
            tokens = np.where(tokens == 0, noise, tokens)
        mask = labels >= 0
        return dict(
            tokens=tokens.astype(np.int32),
            targets=np.where(mask, labels, PAD).astype(np.int32),
            mask=mask,
            hops=mask.astype(np.int32),
        )


RecallTask = MQARTask | MultiHopTask | ZoologyMQARTask
