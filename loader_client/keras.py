"""RemoteSequence: a keras.utils.PyDataset whose batches come from an npyloader server.

Prefetch follows Keras's own order. Keras 3's PyDatasetAdapter, given `workers > 1`, runs an
OrderedEnqueuer whose threads call `__getitem__` in the order it chose (shuffled each epoch
under `fit(shuffle=True)`), up to `max_queue_size` ahead. RemoteSequence sets both to its
prefetch depth, so that many requests are always outstanding, in exactly the order training
will consume them; the threads merely wait while the server's worker processes do the work.
Sequential reads (predict, evaluate, `as_tf_dataset`) also request ahead by index.

The training process never forks: `use_multiprocessing=True` is refused, since the work it
would move out of the process already happens in the server.

Server epoch = Keras epoch. Keras never tells a PyDataset which epoch it is in: it calls
`on_epoch_begin()`/`on_epoch_end()` around each pass, and also `on_epoch_end()` alone whenever
it resets its iterator (before `fit` and `evaluate`, after reading two batches to learn the
element spec). So the sequence counts only passes that began: `fit` from scratch reads server
epoch k in Keras epoch k. A resumed `fit` (`initial_epoch=k`, `BackupAndRestore`) starts at k,
which only the trainer's callbacks are told: `EpochSync` passes it on. Keras's adapter starts its
loader threads before it calls `on_epoch_begin()`, so the epoch is always set before a pass
(at the previous pass's end, or by the callback), never in `on_epoch_begin()` itself.

Keras on JAX and PyTorch builds the model from one batch read through a pass of its own, and
with `workers > 1` its enqueuer keeps the batches that pass had already asked for and serves them
first in the next pass: each epoch would then begin with batches of the one before. So on those
backends RemoteSequence leaves the enqueuer out (`workers=1`, unless asked otherwise) and
prefetches by index alone: `fit(shuffle=False)` keeps the prefetch full, and loses no randomness,
since the server shuffles samples every epoch.

On the server's host, batches are read from its shared memory (`transport="auto"`, see
stream.py): `seq[i]` returns read-only views on a slot, valid for as long as anything refers
to them. The prefetch depth then stays within the slots the server lends one client, so the
batches Keras queues up never keep the server from building the next ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loader_client.requires import keras_missing
from loader_client.stream import SPARE_SLOTS as SHM_SPARE
from loader_client.stream import Batch, Connection, Curve, as_curve, request_stats

try:
    import keras
except ModuleNotFoundError as missing:
    raise keras_missing("RemoteSequence (and EpochSync)", missing) from missing

PREFETCH_BYTES = 512 << 20
MAX_DEFAULT_PREFETCH = 16
SEQUENTIAL_RUN = 2


def default_prefetch(batch_bytes: int, max_held: int = 0) -> int:
    """Deep enough to hide latency, shallow enough that buffered batches stay near 512 MiB.
    Over shared memory (`max_held` > 0) every queued batch holds a slot, so the depth leaves
    room in the client's share of slots for the batch in training and those being built."""
    depth = min(MAX_DEFAULT_PREFETCH, PREFETCH_BYTES // max(batch_bytes, 1))
    if max_held:
        depth = min(depth, max_held - 2 * SHM_SPARE)
    return max(2, depth)


class RemoteSequence(keras.utils.PyDataset):
    """Batches of one dataset served at `url`; `len()` is the number of batches per epoch.

    `seq[i]` is batch i of the current epoch, `(x, y)` (or `x` for datasets without targets);
    the epoch starts at `epoch`, moves on after each pass Keras makes (`on_epoch_begin()`, then
    `on_epoch_end()`: a subclass that overrides either calls `super()`), and `set_epoch()` sets
    it (`EpochSync` does, from Keras's own epoch number). `shard=(rank, world)` gives each of
    `world` trainers a disjoint slice of every epoch. `curve=(my.key_secret, server.key)`
    connects to a server secured with CURVE.
    """

    def __init__(self, url: str, dataset: str = "train", timeout: float = 30.0,
                 prefetch: int | None = None, shard: tuple[int, int] | None = None,
                 epoch: int = 0, curve: Curve = None, transport: str = "auto", **kwargs: Any) -> None:
        if kwargs.pop("use_multiprocessing", False):
            raise ValueError(
                "RemoteSequence(use_multiprocessing=True) would fork the training process; "
                "loading already runs in the server's worker processes, so leave it off")
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self._curve = as_curve(curve)
        self._conn = Connection(url, dataset, timeout=timeout, shard=shard, curve=self._curve, transport=transport)
        info = self._conn.info
        batch_bytes = sum(info.batch_size * spec.nbytes for spec in info.specs)
        self.prefetch = prefetch or default_prefetch(batch_bytes, self._conn.max_held)
        if keras.backend.backend() != "tensorflow":
            kwargs.setdefault("workers", 1)  # no enqueuer: see "Keras on JAX and PyTorch" above
        kwargs.setdefault("workers", self.prefetch)
        kwargs.setdefault("max_queue_size", self.prefetch)
        super().__init__(use_multiprocessing=False, **kwargs)
        self._conn.callers = max(1, self.workers)
        self.url = url
        self.dataset = dataset
        self.epoch = epoch
        self._in_pass = False
        self._read: set[int] = set()  # batch indices read since the epoch was last set
        self._last_index = -2
        self._run = 0

    def __len__(self) -> int:
        return self._conn.info.batches

    def __getitem__(self, index: int) -> Batch | np.ndarray:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"batch {index} is out of range: '{self.dataset}' has {n} batches per epoch")
        # Read ahead by index only once reads look sequential (predict, evaluate): under
        # fit(shuffle=True) two neighbours in a row are rare, and reading ahead there would take
        # workers away from the batches Keras asks for next.
        self._run = self._run + 1 if index == self._last_index + 1 else 0
        if self._run >= SEQUENTIAL_RUN:
            ahead = range(index, min(n, index + 1 + self.prefetch))
            self._conn.request(self.epoch, list(ahead))
        self._last_index = index
        batch = self._conn.get(self.epoch, index)
        self._read.add(index)
        return batch if len(batch) > 1 else batch[0]

    def on_epoch_begin(self) -> None:
        """Keras starts a pass over the current epoch; the loader threads may already be reading it."""
        self._in_pass = True

    def on_epoch_end(self) -> None:
        """After a pass that read every batch, the next epoch. Otherwise this is Keras resetting
        its iterator before `fit` or `evaluate` starts (on JAX and PyTorch, after a pass of its
        own that reads one batch to build the model): the epoch stays, and the batches read to
        learn the element spec are not counted in the pass that follows (it reads them again),
        for its tail's wait."""
        whole = self._in_pass and len(self._read) >= len(self)
        self._in_pass = False
        if whole:
            self.set_epoch(self.epoch + 1)
        else:
            self._read.clear()
            self._conn.restart_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Read `epoch` from now on; batches of other epochs already asked for are cancelled."""
        self.epoch = epoch
        self._read.clear()
        self._last_index = -2
        self._run = 0
        self._conn.cancel_other_epochs(epoch)

    def stats(self) -> dict[str, Any]:
        """How much data arrived and how (`transport`: "shm" or "socket"), and `wait_s`: the wall
        time during which no batch was ready for Keras (all of its loader threads were blocked)."""
        return {**self._conn.stats(), "epoch": self.epoch}

    def server_stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's stats (what `npyloader stats --json` prints), asked with this
        sequence's own CURVE keys, so a secured server answers too."""
        return request_stats(self.url, self._conn.timeout if timeout is None else timeout, curve=self._curve)

    def as_tf_dataset(self) -> Any:
        """A tf.data.Dataset of this stream; each full iteration is one epoch, then the next."""
        import tensorflow as tf

        specs = tuple(tf.TensorSpec((None, *spec.shape), tf.as_dtype(np.dtype(spec.dtype)))
                      for spec in self._conn.info.specs)

        def one_epoch():
            for i in range(len(self)):
                yield self[i]
            self.set_epoch(self.epoch + 1)

        return tf.data.Dataset.from_generator(one_epoch, output_signature=specs if len(specs) > 1 else specs[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RemoteSequence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EpochSync(keras.callbacks.Callback):
    """Points each sequence at Keras's epoch as it begins, so that server epoch = Keras epoch
    also in a resumed run: `fit(initial_epoch=k)`, or `BackupAndRestore` after the trainer died.
    A fresh sequence cannot know k otherwise, and would replay epoch 0's order and augmentation.

    `model.fit(train, validation_data=val, initial_epoch=k, callbacks=[EpochSync(train, val)])`:
    a validation sequence then reads server epoch k after training epoch k.
    """

    def __init__(self, *sequences: RemoteSequence) -> None:
        if not sequences:
            raise ValueError("EpochSync needs the RemoteSequence(s) whose epoch it sets")
        super().__init__()
        self.sequences = sequences

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for seq in self.sequences:
            seq.set_epoch(epoch)
