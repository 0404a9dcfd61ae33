"""RemoteDataset: an npyloader dataset as a torch IterableDataset, for `DataLoader(ds, batch_size=None)`.

The server already batches, shuffles and augments, so each item is a whole batch and the
DataLoader only hands it on. Tensors are made with `torch.from_numpy` on the received arrays: no
copy. Those arrays are read-only (views on the message, or on the server's shared memory mapped
read-only), which torch cannot express; its warning about it is silenced here because the rule
is stated instead: never write into a batch in place. On shared memory an in-place write faults
(SIGSEGV), since the pages are mapped without write permission. `writable=True` gives tensors
of their own (one copy per batch). A tensor keeps its numpy array, and so the shared-memory
lease under it, alive: a slot is given back only once no tensor views it (see shm.py).

DataLoader worker processes (`num_workers > 0`) are refused: they would fork the training
process to do what the server's workers already do, and send every batch through one more copy.
Sharding follows torch.distributed: in an initialised process group each rank reads the slice
`(rank, world_size)` of every epoch, disjoint from the others' and together the whole epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from loader_client.stream import DEFAULT_PREFETCH, Connection, Curve, as_curve, epoch_batches

# torch's text for arrays it cannot write into (torch/csrc/utils/tensor_numpy.cpp)
NOT_WRITABLE = "The given NumPy array is not writable"


def distributed_shard() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default process group, or None without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def as_tensor(array: np.ndarray, writable: bool) -> torch.Tensor:
    """A CPU tensor on `array`'s memory, or on a copy of it when `writable`."""
    if writable:
        return torch.from_numpy(np.array(array))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOT_WRITABLE, category=UserWarning)
        return torch.from_numpy(array)


class RemoteDataset(IterableDataset):
    """The batches of one dataset served at `url`: each iteration is one epoch, `(x, y)` tensors
    per batch (or `x` alone for datasets without targets), then the next epoch.

    `set_epoch(e)` makes the next iteration read epoch `e`, as with DistributedSampler; without
    it each whole pass moves on to the next epoch (a pass left early repeats its epoch).
    `shard=(rank, world)` overrides the shard taken from torch.distributed. `prefetch` batches are
    kept requested ahead of the one being read.
    """

    def __init__(self, url: str, dataset: str = "train", *, epoch: int = 0, timeout: float = 30.0,
                 prefetch: int = DEFAULT_PREFETCH, shard: tuple[int, int] | None = None, curve: Curve = None,
                 transport: str = "auto", writable: bool = False) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        super().__init__()
        self.url = url
        self.dataset = dataset
        self.epoch = epoch
        self.prefetch = prefetch
        self.writable = writable
        self.shard = shard if shard is not None else distributed_shard()
        self._conn = Connection(url, dataset, timeout=timeout, shard=self.shard, curve=as_curve(curve),
                                transport=transport)

    def __len__(self) -> int:
        """Batches per epoch in this shard."""
        assert self._conn.info is not None
        return self._conn.info.batches

    def __iter__(self) -> Iterator[Any]:
        self._refuse_loader_workers()
        epoch = self.epoch
        for arrays in epoch_batches(self._conn, epoch, len(self), self.prefetch):
            batch = tuple(as_tensor(a, self.writable) for a in arrays)
            yield batch if len(batch) > 1 else batch[0]
        if self.epoch == epoch:  # not moved by set_epoch during the pass
            self.epoch = epoch + 1

    def set_epoch(self, epoch: int) -> None:
        """Read `epoch` in the next iteration; batches of other epochs already asked for are cancelled."""
        self.epoch = epoch
        self._conn.cancel_other_epochs(epoch)

    def stats(self) -> dict[str, Any]:
        """What arrived and how, as RemoteSequence.stats(): `wait_s`, `transport`, `copied`, ..."""
        return {**self._conn.stats(), "epoch": self.epoch, "shard": self.shard}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RemoteDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(self._workers_refused("RemoteDataset cannot be sent to another process"))

    @staticmethod
    def _refuse_loader_workers() -> None:
        info = get_worker_info()
        if info is not None:
            raise RuntimeError(RemoteDataset._workers_refused(
                f"RemoteDataset was iterated in DataLoader worker {info.id} of {info.num_workers}"))

    @staticmethod
    def _workers_refused(what: str) -> str:
        return (f"{what}: use DataLoader(dataset, batch_size=None, num_workers=0). Loading already runs in "
                "the npyloader server's worker processes; DataLoader workers would fork the training process "
                "and copy every batch once more. For more loading power, start the server with more --workers")
