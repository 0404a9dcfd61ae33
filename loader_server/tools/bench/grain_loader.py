"""Google Grain delivering the bench's plan, with the options its documentation advises.

The pipeline, Grain's Dataset API (`grain.MapDataset`):

    MapDataset.source(PlanSamples)        plan position -> (epoch, sample id, row), read from the maps
      .map(PlanRotation)                  the plan's rotation, its generator from (epoch, sample id)
      .batch(64)                          stacked inside the worker process
      .to_iter_dataset(ReadOptions(num_threads=0, prefetch_buffer_size=0))
      .mp_prefetch(MultiprocessingOptions(num_workers=N, per_worker_buffer_size=16 // N))

Why the Dataset API and not `grain.DataLoader(worker_count=N)`: the DataLoader hands record keys
to its workers round-robin and runs its Batch operation inside each worker, so with N workers a
batch holds every N-th sample of N consecutive plan batches (Grain's "Behind the Scenes" page
works the example: keys [5, 2, 0, 4, 6, 1, 7, 3] on 2 workers come out [[5, 0], [2, 4], ...]).
`MapDataset.batch` before `mp_prefetch` batches first and then deals whole batches to the
workers, which Grain returns in strict round-robin order: exactly the plan's batches, still read
per sample and batched inside the workers.

Options, and why:
- `num_workers=N`, the worker count every other loader gets.
- `ReadOptions(num_threads=0, prefetch_buffer_size=0)`: `ReadOptions`' docstring recommends 0
  threads when the data are already in memory (here: memory maps over the page cache) "to avoid
  Python GIL contention"; its defaults (16 threads, 500 elements) are tuned for 1-10 KiB records
  on remote disks, and since an element here is a whole batch they would hold 500 batches per
  worker. Each worker process still works ahead through its output buffer.
- `per_worker_buffer_size=16 // N` (DataLoader's `worker_buffer_size`): 16 batches ready in all,
  the depth Keras's queue and npyloader's prefetch get in this bench.
- Shared memory: Grain's workers hand each batch over in a shared-memory block by themselves.
- One iterator across epochs: the source spans epochs from the first one asked for, so worker
  processes (which Grain spawns, never forks) start once, as with `DataLoader(num_epochs=...)`
  or `ds.repeat()` in a training loop; an epoch is the next `num_batches` batches.

Importing this module needs Grain (the registry imports it only when a Grain row is built), and
no training framework: every spawned worker imports it to unpickle the pipeline.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags

from loader_server.data.augment import Rotate
from loader_server.tools.bench.harness import (
    PREFETCH_BATCHES,
    Baseline,
    FitInput,
    FitLoader,
    check_workers,
    count,
    make_baseline,
)
from loader_server.tools.bench.plan import BATCH, Batch, PlanRowReader, rotated
from loader_server.tools.bench.workload import Workload

# Grain keeps its options in absl flags, which only absl.app.run() parses. With JAX installed,
# its profiler hooks read one of them when a worker starts and raise UnparsedFlagAccessError;
# marking the flags parsed gives every flag its default, as absl.app.run() would with no argv.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

# How many epochs one pipeline spans from its first epoch: far more than a bench or test asks for.
EPOCHS_SPANNED = 1_000_000

Sample = tuple[int, int, np.ndarray, np.float32]


class PlanSamples:
    """A Grain data source (`__len__`, `__getitem__`): position p of the plan, counted from the
    start of `first_epoch`, is sample `permutation(epoch)[p % samples]` of epoch
    `first_epoch + p // samples`, returned with its epoch and id for the rotation."""

    def __init__(self, reader: PlanRowReader, first_epoch: int) -> None:
        self.reader = reader
        self.first_epoch = first_epoch

    def __len__(self) -> int:
        return self.reader.samples * EPOCHS_SPANNED

    def __getitem__(self, position: int) -> Sample:
        epoch, offset = divmod(int(position), self.reader.samples)
        epoch += self.first_epoch
        sample_id = int(self.reader.permutation(epoch)[offset])
        x, y = self.reader.read(sample_id)
        return epoch, sample_id, x, y

    def __repr__(self) -> str:
        return f"PlanSamples({self.reader.paths[0].parent}, first_epoch={self.first_epoch})"


class PlanRotation(grain.transforms.Map):
    """The plan's rotation of one sample; its generator comes from (epoch, sample id), not Grain's seed."""

    def __init__(self, rotation: Rotate | None) -> None:
        self.rotation = rotation

    def map(self, element: Sample) -> tuple[np.ndarray, np.float32]:
        epoch, sample_id, x, y = element
        turned = rotated(self.rotation, epoch, sample_id, x)
        return (x if turned is None else turned), y


def pipeline(reader: PlanRowReader, first_epoch: int, workers: int) -> grain.IterDataset:
    """The plan from `first_epoch` on as a Grain IterDataset (see the module's docstring)."""
    options = grain.MultiprocessingOptions(num_workers=workers,
                                           per_worker_buffer_size=max(1, PREFETCH_BATCHES // workers))
    return (grain.MapDataset.source(PlanSamples(reader, first_epoch))
            .map(PlanRotation(reader.rotation))
            .batch(BATCH)
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            .mp_prefetch(options))


def name(workers: int) -> str:
    return f"grain MapDataset.mp_prefetch, {count(workers, 'worker')}"


def grain_dataset(folder: Path, wl: Workload, workers: int) -> Baseline:
    """One iterator carries on from epoch to epoch; an epoch asked for out of turn (after one was
    abandoned half-way) starts a new iterator there, closing the old one and its workers."""
    check_workers(workers)
    reader = PlanRowReader(folder, wl)
    state: dict[str, Any] = {"iterator": None, "next_epoch": None}

    def close_iterator() -> None:
        if state["iterator"] is not None:
            state["iterator"].close()
        state.update(iterator=None, next_epoch=None)

    def epoch(n: int) -> Generator[Batch, None, None]:
        if state["next_epoch"] != n:
            close_iterator()
            state["iterator"] = iter(pipeline(reader, n, workers))
        state["next_epoch"] = None
        batches = state["iterator"]
        for _ in range(reader.num_batches):
            yield next(batches)
        state["next_epoch"] = n + 1

    return make_baseline(name(workers), epoch, close_iterator)


class ClosableIterDataset(grain.IterDataset):
    """A pipeline that remembers the iterators made of it, so that they can be closed.

    Keras makes them (one to read two batches for the output signature, one for training) and
    leaves them to the garbage collector, worker processes and all.
    """

    def __init__(self, parent: grain.IterDataset) -> None:
        super().__init__(parent)
        self._iterators: weakref.WeakSet[grain.DatasetIterator] = weakref.WeakSet()

    def __iter__(self) -> grain.DatasetIterator:
        iterator = self._parent.__iter__()
        self._iterators.add(iterator)
        return iterator

    def close(self) -> None:
        for iterator in list(self._iterators):
            iterator.close()


def fit_loader(folder: Path, wl: Workload, workers: int) -> FitLoader:
    """As a Keras user trains on Grain: `fit(ds, steps_per_epoch=n)` with one dataset spanning the
    epochs, which Keras iterates on across epochs instead of restarting it."""
    check_workers(workers)
    reader = PlanRowReader(folder, wl)

    def start(first_epoch: int) -> FitInput:
        ds = ClosableIterDataset(pipeline(reader, first_epoch, workers))
        return FitInput(ds, steps_per_epoch=reader.num_batches, stop=ds.close)

    return FitLoader(name(workers), start)
