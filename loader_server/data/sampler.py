"""Epoch plans: which samples make up batch i of epoch e, as pure functions of the seed.

Nothing here touches data. Because the plan depends only on (seed, epoch, shard), any
process, worker or restarted server computes the same batches, which is what lets a client
resume at (epoch, batch) and lets batches be byte-identical however many workers run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Plan:
    """How one dataset is cut into batches for one client (its shard)."""

    num_samples: int
    batch_size: int
    seed: int
    shuffle: bool
    drop_remainder: bool
    rank: int = 0
    world: int = 1

    def for_shard(self, shard: Sequence[int] | None) -> Plan:
        """The same plan restricted to shard (rank, world); None means the whole epoch."""
        return self if shard is None else replace(self, rank=shard[0], world=shard[1])

    @property
    def shard_size(self) -> int:
        """Shard r takes every world-th sample of the epoch order from position r."""
        return len(range(self.rank, self.num_samples, self.world))

    @property
    def num_batches(self) -> int:
        if self.drop_remainder:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Global sample ids of batch `index` of `epoch`, in the order they are assembled."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} is out of range: an epoch has {self.num_batches} batches")
        order = _shard_order(self.num_samples, self.seed, epoch, self.shuffle, self.rank, self.world)
        start = index * self.batch_size
        return order[start:start + self.batch_size]


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """A per-sample permutation seeded by SeedSequence([seed, epoch]), or file order."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_samples).astype(np.int64, copy=False)


@lru_cache(maxsize=8)
def _shard_order(num_samples: int, seed: int, epoch: int, shuffle: bool,
                 rank: int, world: int) -> np.ndarray:
    order = epoch_order(num_samples, seed, epoch, shuffle)[rank::world]
    order.setflags(write=False)
    return order
