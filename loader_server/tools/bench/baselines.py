"""The loaders a Keras user would otherwise pick, built to deliver npyloader's batch plan for `npyloader bench`.

A throughput figure for npyloader means little without the alternatives doing the same work on
the same files, so every baseline here follows the plan that bench.py fixes, not its own
library's habits:

- all `wl.samples` samples per epoch, as batches of 64 `(x, y)`, x float32 (64, side, side),
  y float32 (64,);
- a per-sample shuffle: batch i of epoch e is `perm[64*i : 64*(i+1)]` with
  `perm = np.random.default_rng(e).permutation(samples)`;
- samples gathered row by row from memory maps (`np.load(path, mmap_mode="r")`, opened once per
  process), never by loading whole files;
- the workload's `rotate` augmentation per sample: a coin `rng.random() < p`, then an angle
  `rng.uniform(-degrees, degrees)`, from `np.random.default_rng([epoch, sample_id])`, applied with
  `scipy.ndimage.rotate(x, angle, reshape=False, order=...)`. The same work as npyloader's
  workers, not bit-identical output (npyloader seeds its generators differently).

The one exception is `tf_data_pure`, which has no Python in the loop and so uses TensorFlow's own
shuffle, coin and (bilinear) rotation; its name says so.

Each builder returns a `Baseline` whose `epoch(n)` yields numpy arrays as a trainer would receive
them, so bench.py times every loader the same way, and whose `close()` ends any epoch still open
and stops every pool, thread and process the loader started. Nothing is measured here.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
from scipy import ndimage

from loader_server.data.augment import Rotate, build_pipeline
from loader_server.tools.bench.workload import ROWS_PER_FILE, Workload

log = logging.getLogger(__name__)

BATCH = ROWS_PER_FILE
KERAS_QUEUE = 16
Batch = tuple[np.ndarray, np.ndarray]
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}


class BaselineUnavailable(RuntimeError):
    """A baseline that cannot run here (a package is missing); the message says how to enable it."""


@dataclass
class Baseline:
    name: str
    epoch: Callable[[int], Iterator[Batch]]
    close: Callable[[], None]


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def read_header(path: Path) -> NpyHeader:
    """Shape, dtype and data offset of a C-ordered .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f"{path}: .npy format version {version} is not supported here")
        shape, fortran_order, dtype = NPY_HEADER_READERS[version](f)
        if fortran_order:
            raise ValueError(f"{path}: Fortran-ordered arrays cannot be gathered row by row")
        return NpyHeader(shape, dtype, f.tell())


def rotation_of(wl: Workload) -> Rotate | None:
    """The workload's rotate op, validated by npyloader's own parser (same defaults and checks)."""
    ops = build_pipeline(list(wl.augment), spatial_targets=False).ops
    if not ops:
        return None
    if len(ops) != 1 or not isinstance(ops[0], Rotate):
        raise ValueError(f"the baselines implement a single rotate op, not {list(wl.augment)}")
    return ops[0]


class PlanRowReader:
    """Gathers and augments the plan's samples from memory maps.

    Picklable (the maps are dropped and reopened), so a pool that spawns rather than forks can
    take it; a forked worker inherits the parent's maps instead of reopening them.
    """

    def __init__(self, folder: Path, wl: Workload) -> None:
        self.paths = sorted(Path(folder).glob("*.npy"))
        if not self.paths:
            raise FileNotFoundError(f"no .npy files in {folder}; write them with bench.write_files")
        rows = [self._rows(path, wl.side) for path in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(rows)])
        if self.starts[-1] != wl.samples or wl.samples % BATCH:
            raise ValueError(f"{folder} holds {self.starts[-1]} samples; the workload wants {wl.samples}, "
                             f"a multiple of {BATCH}")
        self.side = wl.side
        self.samples = wl.samples
        self.rotation = rotation_of(wl)
        self._perm: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self._maps = self._open()

    @staticmethod
    def _rows(path: Path, side: int) -> int:
        header = read_header(path)
        if header.dtype != np.dtype("<f4") or len(header.shape) != 2 or header.shape[1] != side * side + 1:
            raise ValueError(f"{path}: expected little-endian float32 rows of {side * side + 1} values, "
                             f"got {header.dtype} {header.shape}")
        return header.shape[0]

    def _open(self) -> list[np.ndarray]:
        return [np.load(path, mmap_mode="r") for path in self.paths]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = self._open()

    @property
    def num_batches(self) -> int:
        return self.samples // BATCH

    def permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._perm
        if cached_epoch != epoch:
            perm = np.random.default_rng(epoch).permutation(self.samples)
            self._perm = (epoch, perm)
        return perm

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch`: 64 rows gathered one by one, each augmented on its own."""
        ids = self.permutation(epoch)[BATCH * index:BATCH * (index + 1)]
        x = np.empty((len(ids), self.side, self.side), np.float32)
        y = np.empty(len(ids), np.float32)
        for j, sample_id in enumerate(ids):
            y[j] = self._read_into(int(sample_id), x[j])
            rotated = self._rotated(epoch, int(sample_id), x[j])
            if rotated is not None:
                x[j] = rotated
        return x, y

    def sample(self, epoch: int, sample_id: int) -> tuple[np.ndarray, np.float32]:
        x = np.empty((self.side, self.side), np.float32)
        y = self._read_into(sample_id, x)
        rotated = self._rotated(epoch, sample_id, x)
        return (x if rotated is None else rotated), y

    def _read_into(self, sample_id: int, out: np.ndarray) -> np.float32:
        """Copy one sample's features into `out` (one copy from the page cache); return its label."""
        f = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        row = self._maps[f][sample_id - self.starts[f]]
        out[...] = row[:-1].reshape(self.side, self.side)
        return row[-1]

    def _rotated(self, epoch: int, sample_id: int, x: np.ndarray) -> np.ndarray | None:
        """x rotated if the sample's coin says so, else None (x is then used as it is)."""
        rot = self.rotation
        if rot is None:
            return None
        rng = np.random.default_rng([epoch, sample_id])
        if rng.random() >= rot.p:
            return None
        angle = rng.uniform(-rot.degrees, rot.degrees)
        return ndimage.rotate(x, angle, reshape=False, order=rot.order, mode=rot.mode)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def _baseline(name: str, epochs: Callable[[int], Generator[Batch, None, None]],
              stop: Callable[[], None] = lambda: None) -> Baseline:
    """Wrap an epoch generator so that close() first ends any epoch still open, then `stop`s."""
    open_epochs: weakref.WeakSet[Generator[Batch, None, None]] = weakref.WeakSet()
    closed = False

    def epoch(n: int) -> Iterator[Batch]:
        if closed:
            raise RuntimeError(f"{name}: epoch({n}) after close()")
        batches = epochs(n)
        open_epochs.add(batches)
        return batches

    def close() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        for batches in list(open_epochs):
            batches.close()
        stop()
        log.debug("%s: closed", name)

    return Baseline(name, epoch, close)


class PlanPyDataset(keras.utils.PyDataset):
    """What a Keras user would write: `__getitem__(i)` builds batch i of the current epoch.

    `on_epoch_end` advances the epoch, as `fit` relies on; the benchmark also sets it before
    each epoch so that `epoch(n)` delivers epoch n whatever ran before.
    """

    def __init__(self, reader: PlanRowReader, workers: int, use_multiprocessing: bool) -> None:
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=KERAS_QUEUE)
        self.reader = reader
        self.epoch = 0

    def __len__(self) -> int:
        return self.reader.num_batches

    def __getitem__(self, index: int) -> Batch:
        return self.reader.batch(self.epoch, index)

    def on_epoch_end(self) -> None:
        self.epoch += 1


def _record_pools(adapter: PyDatasetAdapter, pools: list[Any]) -> None:
    """Keep every pool Keras's enqueuer makes (one per epoch), so that close() can reap them.

    Keras only `close()`s its pool at the end of an epoch and never joins it.
    """
    if adapter.enqueuer is None:
        return
    make_pool = adapter.enqueuer.executor_fn

    def make_and_record(shared: dict) -> Any:
        pool = make_pool(shared)
        pools.append(pool)
        return pool

    adapter.enqueuer.executor_fn = make_and_record


def _pydataset(folder: Path, wl: Workload, workers: int, use_multiprocessing: bool, name: str) -> Baseline:
    """Iterated as `fit` does, through Keras's own adapter: begin, numpy iterator, end.

    A fresh adapter per epoch (Keras makes a fresh pool per epoch anyway) so that an epoch
    abandoned half-way cannot leave batches in the enqueuer's queue for the next one.
    """
    _check_workers(workers)
    dataset = PlanPyDataset(PlanRowReader(folder, wl), workers, use_multiprocessing)
    pools: list[Any] = []

    def epoch(n: int) -> Generator[Batch, None, None]:
        dataset.epoch = n
        adapter = PyDatasetAdapter(dataset, shuffle=False)
        _record_pools(adapter, pools)
        adapter.on_epoch_begin()
        try:
            yield from adapter.get_numpy_iterator()
        finally:
            adapter.on_epoch_end()

    def stop() -> None:
        for pool in pools:
            pool.terminate()
            pool.join()
        pools.clear()

    return _baseline(name, epoch, stop)


def pydataset_threads(folder: Path, wl: Workload, workers: int) -> Baseline:
    return _pydataset(folder, wl, workers, False, f"keras PyDataset, {_count(workers, 'thread')}")


def pydataset_processes(folder: Path, wl: Workload, workers: int) -> Baseline:
    name = f"keras PyDataset, use_multiprocessing, {_count(workers, 'worker')}"
    return _pydataset(folder, wl, workers, True, name)


def _with_threads(ds: tf.data.Dataset, workers: int) -> tf.data.Dataset:
    """AUTOTUNE within a pool of `workers` threads: the same CPU budget as the other loaders."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    return ds.with_options(options)


def _tf_epochs(ds: tf.data.Dataset, epoch_var: tf.Variable) -> Callable[[int], Generator[Batch, None, None]]:
    """One dataset built (and traced) once; each epoch sets the epoch it reads, then iterates it."""

    def epoch(n: int) -> Generator[Batch, None, None]:
        epoch_var.assign(n)
        yield from ds.as_numpy_iterator()

    return epoch


def tf_data_numpy_function(folder: Path, wl: Workload, workers: int) -> Baseline:
    """tf.data driving the same Python batch function through `tf.numpy_function` (GIL-bound)."""
    _check_workers(workers)
    reader = PlanRowReader(folder, wl)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)

    def load_batch(epoch: np.int64, index: np.int64) -> Batch:
        return reader.batch(int(epoch), int(index))

    def fetch(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(load_batch, [epoch_var.read_value(), index], [tf.float32, tf.float32])
        x.set_shape((BATCH, wl.side, wl.side))
        y.set_shape((BATCH,))
        return x, y

    ds = (tf.data.Dataset.range(reader.num_batches)
          .map(fetch, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    name = f"tf.data numpy_function, {_count(workers, 'thread')}"
    return _baseline(name, _tf_epochs(_with_threads(ds, workers), epoch_var))


def _tf_rotation(wl: Workload) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]:
    """Per-sample: a stateless coin from (epoch, sample id), then Keras's RandomRotation if it lands."""
    rot = rotation_of(wl)
    if rot is None:
        return lambda x, epoch, sample_id: x
    layer = keras.layers.RandomRotation(rot.degrees / 360, fill_mode="constant", interpolation="bilinear", seed=0)

    def augment(x: tf.Tensor, epoch: tf.Tensor, sample_id: tf.Tensor) -> tf.Tensor:
        coin = tf.random.stateless_uniform([], seed=tf.stack([epoch, sample_id]))
        return tf.cond(coin < rot.p, lambda: layer(x[..., None], training=True)[..., 0], lambda: x)

    return augment


def tf_data_pure(folder: Path, wl: Workload, workers: int) -> Baseline:
    """No Python per sample: read whole files, decode, full per-sample shuffle, TF rotation.

    The shuffle needs every sample in its buffer before the first batch: tf.data's way of
    shuffling per sample, not a choice made here.
    """
    _check_workers(workers)
    paths = PlanRowReader(folder, wl).paths
    header = read_header(paths[0])
    payload = int(np.prod(header.shape)) * 4
    wrong = [p for p in paths if p.stat().st_size != header.offset + payload]
    if wrong:
        raise ValueError(f"every file must have {paths[0]}'s header and size; these differ: {wrong[:3]}")
    augment = _tf_rotation(wl)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)

    def read_rows(path: tf.Tensor) -> tf.Tensor:
        data = tf.strings.substr(tf.io.read_file(path), header.offset, payload)
        return tf.reshape(tf.io.decode_raw(data, tf.float32, little_endian=True), header.shape)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        def split(sample_id: tf.Tensor, row: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            x = tf.reshape(row[:-1], (wl.side, wl.side))
            return augment(x, epoch, sample_id), row[-1]

        return (tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
                .map(read_rows, num_parallel_calls=tf.data.AUTOTUNE)
                .unbatch()
                .enumerate()
                .shuffle(wl.samples, seed=epoch)
                .map(split, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(BATCH))

    ds = (tf.data.Dataset.range(1)
          .map(lambda _: epoch_var.read_value())
          .flat_map(one_epoch)
          .prefetch(tf.data.AUTOTUNE))
    kind = "tf.data pure TF (bilinear rotate)" if wl.augment else "tf.data pure TF"
    return _baseline(f"{kind}, {_count(workers, 'thread')}", _tf_epochs(_with_threads(ds, workers), epoch_var))


class TorchSamples:
    """A map-style dataset for torch's DataLoader: index (epoch, sample id) -> one sample.

    The epoch travels in the index because persistent workers keep the copy of the dataset
    they started with. Duck-typed (DataLoader needs only `__getitem__` and `__len__`) so that
    this module imports without torch and stays picklable for spawned workers.
    """

    def __init__(self, reader: PlanRowReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.samples

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
        return self.reader.sample(*key)


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


def _torch_worker_init(worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)


def _collate(samples: list[tuple[np.ndarray, np.float32]]) -> tuple[Any, Any]:
    """Stack into numpy, handed over as tensors so the batch crosses to the trainer in shared
    memory, as torch's default collate would do (a numpy batch would be pickled through a pipe)."""
    import torch

    x = np.stack([s[0] for s in samples])
    y = np.array([s[1] for s in samples], np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def torch_dataloader(folder: Path, wl: Workload, workers: int) -> Baseline:
    try:
        from torch.utils.data import DataLoader
    except ImportError as e:
        raise BaselineUnavailable("torch is not installed: pip install torch") from e
    _check_workers(workers)
    reader = PlanRowReader(folder, wl)
    sampler = EpochSampler(reader)
    loader = DataLoader(TorchSamples(reader), batch_size=BATCH, sampler=sampler, num_workers=workers,
                        persistent_workers=True, collate_fn=_collate, worker_init_fn=_torch_worker_init)

    def epoch(n: int) -> Generator[Batch, None, None]:
        sampler.epoch = n
        for x, y in loader:
            yield x.numpy(), y.numpy()

    def stop() -> None:
        workers_iter = getattr(loader, "_iterator", None)
        if workers_iter is not None:
            workers_iter._shutdown_workers()
            loader._iterator = None

    return _baseline(f"torch DataLoader, {_count(workers, 'worker')}", epoch, stop)


ALL: dict[str, Callable[[Path, Workload, int], Baseline]] = {
    "keras-threads": pydataset_threads,
    "keras-processes": pydataset_processes,
    "tf-numpy-function": tf_data_numpy_function,
    "tf-pure": tf_data_pure,
    "torch": torch_dataloader,
}
