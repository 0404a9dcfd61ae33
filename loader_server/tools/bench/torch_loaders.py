"""torch's DataLoader delivering the bench's plan, in the two ways a torch user would write it.

- per sample: the textbook map-style dataset, `__getitem__` -> one sample, batched by the
  DataLoader (`batch_size=64`, a sampler yielding the plan's order, a numpy collate);
- a batch per item: torch's fastest idiom for this kind of data, `__getitem__` -> a whole batch
  (the plan's sample ids for that batch), with `DataLoader(batch_size=None)`: no per-sample
  indexing through the DataLoader, no collate (torch only turns the arrays into tensors).

Both use `num_workers=N` persistent workers (forked, so they inherit the parent's memory maps), a
sampler that carries the epoch in every key (persistent workers keep the dataset they started
with), and one intra-op thread per worker. torch is optional: without it each builder raises
BaselineUnavailable and the bench reports the row as not measured. The datasets and samplers
are duck-typed (DataLoader needs only `__getitem__`/`__len__`, `__iter__`/`__len__`), so this
module imports without torch.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loader_server.tools.bench.harness import (
    Baseline,
    BaselineUnavailable,
    FitInput,
    FitLoader,
    check_workers,
    count,
    make_baseline,
)
from loader_server.tools.bench.plan import BATCH, Batch, PlanRowReader
from loader_server.tools.bench.workload import Workload

PER_SAMPLE = "torch DataLoader, per sample"
BATCH_PER_ITEM = "torch DataLoader, a batch per item"


class TorchSamples:
    """Map-style dataset: key (epoch, sample id) -> one sample, read and rotated."""

    def __init__(self, reader: PlanRowReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.samples

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
        return self.reader.sample(*key)


class TorchBatches:
    """Map-style dataset: key (epoch, batch index) -> the plan's whole batch, built in the worker."""

    def __init__(self, reader: PlanRowReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_batches

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        return self.reader.batch(*key)


class EpochSampler:
    """The plan's per-sample permutation for the epoch set before each `iter(loader)`."""

    def __init__(self, reader: PlanRowReader) -> None:
        self.reader = reader
        self.epoch = 0

    def __len__(self) -> int:
        return self.reader.samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, int(s)) for s in self.reader.permutation(epoch)])


class EpochBatchSampler:
    """Batch indices 0..n-1 of the epoch set before each `iter(loader)`: the plan orders samples
    within batches, so batches themselves come in index order."""

    def __init__(self, reader: PlanRowReader) -> None:
        self.reader = reader
        self.epoch = 0

    def __len__(self) -> int:
        return self.reader.num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in range(self.reader.num_batches)])


def _worker_init(worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)


def _collate(samples: list[tuple[np.ndarray, np.float32]]) -> tuple[Any, Any]:
    """Stack into numpy, handed over as tensors so the batch crosses to the trainer in shared
    memory, as torch's default collate would do (a numpy batch would be pickled through a pipe)."""
    import torch

    x = np.stack([s[0] for s in samples])
    y = np.array([s[1] for s in samples], np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def _data_loader_class() -> type:
    try:
        from torch.utils.data import DataLoader
    except ImportError as e:
        raise BaselineUnavailable("torch is not installed: pip install torch (the CPU build is enough)") from e
    return DataLoader


def loader(folder: Path, wl: Workload, workers: int, per_sample: bool) -> tuple[Any, EpochSampler | EpochBatchSampler]:
    """The DataLoader and the sampler whose `epoch` picks the epoch it delivers next."""
    data_loader = _data_loader_class()
    check_workers(workers)
    reader = PlanRowReader(folder, wl)
    if per_sample:
        sampler: EpochSampler | EpochBatchSampler = EpochSampler(reader)
        return data_loader(TorchSamples(reader), batch_size=BATCH, sampler=sampler, num_workers=workers,
                           persistent_workers=True, collate_fn=_collate, worker_init_fn=_worker_init), sampler
    sampler = EpochBatchSampler(reader)
    return data_loader(TorchBatches(reader), batch_size=None, sampler=sampler, num_workers=workers,
                       persistent_workers=True, worker_init_fn=_worker_init), sampler


def shutdown(data_loader: Any) -> None:
    """Stop persistent workers now: torch otherwise waits for the loader to be collected."""
    workers_iter = getattr(data_loader, "_iterator", None)
    if workers_iter is not None:
        workers_iter._shutdown_workers()
        data_loader._iterator = None


def name(workers: int, per_sample: bool) -> str:
    return f"{PER_SAMPLE if per_sample else BATCH_PER_ITEM}, {count(workers, 'worker')}"


def _baseline(folder: Path, wl: Workload, workers: int, per_sample: bool) -> Baseline:
    data_loader, sampler = loader(folder, wl, workers, per_sample)

    def epoch(n: int) -> Generator[Batch, None, None]:
        sampler.epoch = n
        for x, y in data_loader:
            yield x.numpy(), y.numpy()

    return make_baseline(name(workers, per_sample), epoch, lambda: shutdown(data_loader))


def torch_per_sample(folder: Path, wl: Workload, workers: int) -> Baseline:
    return _baseline(folder, wl, workers, per_sample=True)


def torch_batch(folder: Path, wl: Workload, workers: int) -> Baseline:
    return _baseline(folder, wl, workers, per_sample=False)


def fit_loader(folder: Path, wl: Workload, workers: int, per_sample: bool) -> FitLoader:
    """As a Keras user trains on torch: `fit(data_loader)`, with a callback whose `on_epoch_begin`
    points the sampler at the epoch (Keras iterates the DataLoader afresh each epoch)."""
    _data_loader_class()
    check_workers(workers)

    def start(first_epoch: int) -> FitInput:
        data_loader, sampler = loader(folder, wl, workers, per_sample)

        def set_epoch(n: int) -> None:
            sampler.epoch = n

        return FitInput(data_loader, on_epoch_begin=set_epoch, stop=lambda: shutdown(data_loader))

    return FitLoader(name(workers, per_sample), start)
