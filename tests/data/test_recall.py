"""The recall task generators (fwjax.data.recall): determinism, layout, and targets re-derived
independently from the tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fwjax.data.recall import SEP, MQARTask, MultiHopTask

MQAR = MQARTask(6, num_queries=4, num_distractors=5, num_keys=10, num_values=7, num_noise=3)
HOP = MultiHopTask(3, chain_length=3, max_hops=2, num_queries=9, num_distractors=4, num_entities=13)


def _pairs(task, tokens):
    """The written pairs of one sequence, read from the tokens alone: a key-range token followed
    by a value-range token; also the distractors."""
    ctx = tokens[: task.context_length]
    is_key = (ctx >= task.key_offset) & (ctx < task.value_offset)
    is_value = (ctx >= task.value_offset) & (ctx < task.noise_offset)
    table = {}
    for i in np.flatnonzero(is_key):
        assert is_value[i + 1], "a key is always followed by its value"
        assert int(ctx[i]) not in table, "keys are distinct"
        table[int(ctx[i])] = int(ctx[i + 1])
    assert is_key.sum() == is_value.sum() == task.num_pairs
    noise = ctx[~is_key & ~is_value]
    return table, noise


@pytest.mark.parametrize("task", [MQAR, HOP], ids=["mqar", "multihop"])
def test_batches_are_deterministic_typed_and_shaped(task):
    a = task.batch(3, 7, 5)
    b = task.batch(3, 7, 5)
    for name in ("tokens", "targets", "mask", "hops"):
        assert a[name].shape == (5, task.length)
        np.testing.assert_array_equal(a[name], b[name])
    assert a["tokens"].dtype == a["targets"].dtype == a["hops"].dtype == np.int32
    assert a["mask"].dtype == bool
    assert a["tokens"].min() >= 1 and a["tokens"].max() < task.vocab_size
    for other in (task.batch(4, 7, 5), task.batch(3, 8, 5), task.batch(3, 7, 5, eval=True)):
        assert not np.array_equal(a["tokens"], other["tokens"])
    # Masks: one answer per query, all after SEP, only there non-PAD targets and hops.
    assert (a["mask"].sum(axis=1) == task.num_queries).all()
    assert (a["tokens"][:, task.context_length] == SEP).all()
    assert not a["mask"][:, : task.context_length + 1].any()
    np.testing.assert_array_equal(a["targets"] != 0, a["mask"])
    np.testing.assert_array_equal(a["hops"] != 0, a["mask"])


def test_mqar_targets_are_the_values_of_the_written_keys():
    batch = MQAR.batch(0, 1, 8)
    for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["mask"], strict=True):
        table, noise = _pairs(MQAR, tokens)
        assert len(noise) == MQAR.num_distractors
        assert ((noise >= MQAR.noise_offset) & (noise < MQAR.vocab_size)).all()
        positions = np.flatnonzero(mask)
        asked = [int(tokens[p]) for p in positions]
        assert len(set(asked)) == MQAR.num_queries  # distinct queried keys
        for p in positions:
            assert targets[p] == table[int(tokens[p])]
            assert tokens[p + 1] == targets[p]  # the answer follows (teacher forcing)
            assert int(tokens[p]) not in set(noise.tolist())  # distractors are never queried


def test_multihop_pairs_form_chains_and_targets_follow_them():
    batch = HOP.batch(2, 0, 8)
    seen_hops = set()
    for row in range(8):
        tokens, targets = batch["tokens"][row], batch["targets"][row]
        table, _ = _pairs(HOP, tokens)
        # f on entity ids (each entity has one id per role).
        f = {k - HOP.key_offset: v - HOP.value_offset for k, v in table.items()}
        assert len(set(f.values())) == len(f)  # injective: chains never merge
        starts = set(f) - set(f.values())
        assert len(starts) == HOP.num_chains
        for s in starts:  # each chain has exactly chain_length links and no cycle
            e, n = s, 0
            while e in f:
                e, n = f[e], n + 1
            assert n == HOP.chain_length
        for p in np.flatnonzero(batch["mask"][row]):
            h = int(batch["hops"][row, p])
            seen_hops.add(h)
            assert tokens[p - 1] == SEP + h  # HOP_h precedes the queried entity
            e = int(tokens[p]) - HOP.key_offset
            for _ in range(h):
                e = f[e]
            assert targets[p] == e + HOP.value_offset
            assert tokens[p + 1] == targets[p]
    assert seen_hops == {1, 2}


def test_multihop_relabels_entities_per_sequence():
    tokens = HOP.batch(0, 0, 2)["tokens"]
    a, _ = _pairs(HOP, tokens[0])
    b, _ = _pairs(HOP, tokens[1])
    assert a != b


def test_multihop_curriculum_scores_only_one_hop_answers_in_early_training_batches():
    """``one_hop_steps``: training batches before it keep every token but score 1-hop answers
    only; later batches and every evaluation batch are the plain task's."""
    task = dataclasses.replace(HOP, one_hop_steps=2)
    for index, eval_, curriculum in ((0, False, True), (1, False, True), (2, False, False)):
        for ev in (eval_, True):
            got, plain = task.batch(5, index, 16, eval=ev), HOP.batch(5, index, 16, eval=ev)
            np.testing.assert_array_equal(got["tokens"], plain["tokens"])
            if curriculum and not ev:
                one_hop = plain["hops"] == 1
                assert (plain["hops"] == 2).any() and one_hop.any()
                np.testing.assert_array_equal(got["mask"], plain["mask"] & one_hop)
                want_targets = np.where(one_hop, plain["targets"], 0)
                np.testing.assert_array_equal(got["targets"], want_targets)
                np.testing.assert_array_equal(got["hops"], np.where(one_hop, 1, 0))
            else:
                for name in ("mask", "targets", "hops"):
                    np.testing.assert_array_equal(got[name], plain[name])


def test_lengths_follow_the_sizes():
    assert MQARTask(8, num_distractors=8).length == 2 * 8 + 8 + 1 + 2 * 8
    assert MultiHopTask(4, num_distractors=3, num_queries=5).length == 2 * 8 + 3 + 1 + 3 * 5
    assert MQARTask(8).num_queries == 8 and MultiHopTask(4).num_queries == 8


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MQARTask(65, num_keys=64), r"self.num_pairs=65 must be <= self.num_keys=64"),
        (lambda: MQARTask(4, num_queries=5), r"self.num_queries=5 must be <= self.num_pairs=4"),
        (lambda: MQARTask(0), r"num_pairs=0 must be a positive int"),
        (lambda: MQARTask(4, num_distractors=-1), r"num_distractors=-1 must be a non-negative int"),
        (lambda: MQARTask(True), r"num_pairs=True must be a positive int"),
        (lambda: MultiHopTask(2, chain_length=1, max_hops=2), r"max_hops=2 must be <= "),
        (lambda: MultiHopTask(22, num_entities=64), r"need 66 distinct entities"),
        (lambda: MultiHopTask(2, one_hop_steps=-1), r"one_hop_steps=-1 must be a non-negative"),
    ],
)
def test_invalid_sizes_name_the_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_zoology_mqar_follows_zoologys_layout():
    """Zoology's ``multiquery_ar``: P pairs first (keys below V/2, values above), then each key
    queried once at an even offset after the pairs, its value predicted at the query."""
    from fwjax.data.recall import ZoologyMQARTask

    task = ZoologyMQARTask(vocab_size=40, length=32, num_pairs=4, random_non_queries=False)
    batch = task.batch(seed=0, index=3, batch_size=16)
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["mask"]
    keys, values = tokens[:, 0:8:2], tokens[:, 1:8:2]
    assert (keys >= 1).all() and (keys < 20).all() and (values >= 20).all()
    assert all(len(set(row)) == 4 for row in keys)
    assert (mask.sum(axis=1) == 4).all() and not mask[:, :8].any()
    rows, cols = np.nonzero(mask)
    assert ((cols - 8) % 2 == 0).all()
    for r, c in zip(rows, cols, strict=True):  # the query is a key; its target is that key's value
        (i,) = np.nonzero(keys[r] == tokens[r, c])[0]
        assert targets[r, c] == values[r, i]
    assert (tokens[~mask][:, None] == 0).sum() > 0  # without random fill, the rest is 0
    noisy = ZoologyMQARTask(vocab_size=40, length=32, num_pairs=4).batch(0, 3, 16)
    np.testing.assert_array_equal(noisy["targets"], targets)  # same draw, random filler
    assert (noisy["tokens"] != 0).mean() > 0.9


def test_zoology_mqar_gaps_follow_the_power_law_and_sizes_are_checked():
    from fwjax.data.recall import ZoologyMQARTask

    batch = ZoologyMQARTask(vocab_size=1024, length=64, num_pairs=8).batch(0, 0, 512)
    counts = np.bincount(np.nonzero(batch["mask"])[1], minlength=64)[16::2]
    assert counts[0] > 2 * counts[-1]  # short gaps are the likely ones
    with pytest.raises(ValueError, match="length >= 4"):
        ZoologyMQARTask(vocab_size=1024, length=16, num_pairs=8)
    with pytest.raises(ValueError, match="must exceed"):
        ZoologyMQARTask(vocab_size=32, length=64, num_pairs=8)
