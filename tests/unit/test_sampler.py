"""Epoch plans are pure functions of (seed, epoch, shard): exactly-once, reproducible, disjoint."""

import numpy as np
import pytest

from loader_server.data.sampler import Plan, epoch_order


def all_batches(plan: Plan, epoch: int) -> list[np.ndarray]:
    return [plan.batch(epoch, i) for i in range(plan.num_batches)]


def test_every_sample_appears_exactly_once_per_epoch_with_a_partial_last_batch():
    plan = Plan(num_samples=203, batch_size=16, seed=7, shuffle=True, drop_remainder=False)
    batches = all_batches(plan, 0)
    assert plan.num_batches == 13 and len(batches[-1]) == 203 - 12 * 16
    assert sorted(np.concatenate(batches).tolist()) == list(range(203))


def test_drop_remainder_serves_only_full_batches():
    plan = Plan(203, 16, 0, True, drop_remainder=True)
    assert plan.num_batches == 12
    assert all(len(b) == 16 for b in all_batches(plan, 0))


def test_order_is_per_sample_and_changes_with_epoch_but_not_with_repetition():
    plan = Plan(1000, 10, 3, True, False)
    e0, e0_again, e1 = (np.concatenate(all_batches(plan, e)) for e in (0, 0, 1))
    assert np.array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, np.arange(1000))


def test_no_shuffle_keeps_file_order():
    plan = Plan(50, 8, 3, shuffle=False, drop_remainder=False)
    assert np.array_equal(np.concatenate(all_batches(plan, 5)), np.arange(50))


def test_shards_are_disjoint_and_together_cover_the_epoch():
    world = 3
    plans = [Plan(101, 8, 1, True, False, rank=r, world=world) for r in range(world)]
    ids = [np.concatenate(all_batches(p, 2)) for p in plans]
    assert sum(p.shard_size for p in plans) == 101
    assert sorted(np.concatenate(ids).tolist()) == list(range(101))
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(ids[a]) & set(ids[b])


def test_plan_matches_the_documented_seed_sequence():
    expected = np.random.default_rng(np.random.SeedSequence([5, 9])).permutation(40)
    assert np.array_equal(epoch_order(40, seed=5, epoch=9, shuffle=True), expected)


def test_out_of_range_batch_names_the_epoch_length():
    with pytest.raises(IndexError, match="13 batches"):
        Plan(203, 16, 0, True, False).batch(0, 13)
