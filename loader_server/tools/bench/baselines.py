"""The loaders a Keras user would otherwise pick, built to deliver npyloader's batch plan for `npyloader bench`.

A throughput figure for npyloader means little without the alternatives doing the same work on
the same files, so every baseline follows the plan that plan.py states, not its own library's
habits: the same samples per epoch in the same per-sample shuffled order, batches of 64, each
sample gathered from a memory map and rotated with its own generator.

The one exception is `tf_data_pure`, which has no Python in the loop and so uses TensorFlow's own
shuffle, coin and (bilinear) rotation; its name says so.

Here: Keras's PyDataset (threads, processes) and tf.data; torch and Grain live in their own
modules (both optional). `ALL` names every row the bench can measure, and `FIT_LOADERS` the
loaders that also get a row through `model.fit` (via_fit.py): one entry each. Each builder
returns a `Baseline` whose `epoch(n)` yields numpy arrays as a trainer would receive them, so the
runner times every loader the same way, and whose `close()` ends any epoch still open and stops
every pool, thread and process the loader started. Nothing is measured here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Generator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

from loader_server.tools.bench import torch_loaders
from loader_server.tools.bench.harness import (
    PREFETCH_BATCHES,
    Baseline,
    BaselineUnavailable,
    FitInput,
    FitLoader,
    check_workers,
    count,
    make_baseline,
)
from loader_server.tools.bench.plan import (
    BATCH,
    Batch,
    PlanRowReader,
    read_header,
    rotation_of,
)
from loader_server.tools.bench.via_fit import through_fit
from loader_server.tools.bench.workload import Workload


class PlanPyDataset(keras.utils.PyDataset):
    """What a Keras user would write: `__getitem__(i)` builds batch i of the current epoch.

    `on_epoch_end` advances the epoch, as `fit` relies on; the benchmark also sets it before
    each epoch so that `epoch(n)` delivers epoch n whatever ran before.
    """

    def __init__(self, reader: PlanRowReader, workers: int, use_multiprocessing: bool) -> None:
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=PREFETCH_BATCHES)
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


def _reap(pools: list[Any]) -> None:
    for pool in pools:
        pool.terminate()
        pool.join()
    pools.clear()


def _pydataset_name(workers: int, use_multiprocessing: bool) -> str:
    if use_multiprocessing:
        return f"keras PyDataset, use_multiprocessing, {count(workers, 'worker')}"
    return f"keras PyDataset, {count(workers, 'thread')}"


def _pydataset(folder: Path, wl: Workload, workers: int, use_multiprocessing: bool) -> Baseline:
    """Iterated as `fit` does on the JAX and NumPy backends, through Keras's own adapter: begin,
    numpy iterator, end. (The TensorFlow backend's path is the row through fit, via_fit.py.)

    A fresh adapter per epoch (Keras makes a fresh pool per epoch anyway) so that an epoch
    abandoned half-way cannot leave batches in the enqueuer's queue for the next one.
    """
    check_workers(workers)
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

    return make_baseline(_pydataset_name(workers, use_multiprocessing), epoch, lambda: _reap(pools))


def pydataset_threads(folder: Path, wl: Workload, workers: int) -> Baseline:
    return _pydataset(folder, wl, workers, False)


def pydataset_processes(folder: Path, wl: Workload, workers: int) -> Baseline:
    return _pydataset(folder, wl, workers, True)


def pydataset_fit_loader(folder: Path, wl: Workload, workers: int, use_multiprocessing: bool) -> FitLoader:
    """`fit(dataset, shuffle=False)`: the adapter fit would build, handed over ready made so that
    its pools are recorded; `on_epoch_end` advances the epoch as in training, and the epoch is
    also set at each start so that `epoch(n)` delivers epoch n."""
    check_workers(workers)
    reader = PlanRowReader(folder, wl)

    def start(first_epoch: int) -> FitInput:
        dataset = PlanPyDataset(reader, workers, use_multiprocessing)
        adapter = PyDatasetAdapter(dataset, shuffle=False)
        pools: list[Any] = []
        _record_pools(adapter, pools)

        def set_epoch(n: int) -> None:
            dataset.epoch = n

        set_epoch(first_epoch)
        return FitInput(adapter, on_epoch_begin=set_epoch, stop=lambda: _reap(pools))

    return FitLoader(_pydataset_name(workers, use_multiprocessing), start)


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
    check_workers(workers)
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
    name = f"tf.data numpy_function, {count(workers, 'thread')}"
    return make_baseline(name, _tf_epochs(_with_threads(ds, workers), epoch_var))


def _tf_rotation(wl: Workload) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]:
    """Per-sample and stateless: a coin and an angle from (epoch, sample id), then a bilinear
    rotation about the centre (TensorFlow's own projective transform, as Keras's RandomRotation
    uses). Nothing here depends on a global seed, so the pipeline is the same in any process."""
    rot = rotation_of(wl)
    if rot is None:
        return lambda x, epoch, sample_id: x
    side = float(wl.side - 1)

    def rotate(x: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
        cos, sin = tf.cos(angle), tf.sin(angle)
        dx = (side - (cos * side - sin * side)) / 2
        dy = (side - (sin * side + cos * side)) / 2
        transform = tf.stack([cos, -sin, dx, sin, cos, dy, 0.0, 0.0])[None]
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None, ..., None], transforms=transform, output_shape=tf.shape(x), fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")
        return out[0, ..., 0]

    def augment(x: tf.Tensor, epoch: tf.Tensor, sample_id: tf.Tensor) -> tf.Tensor:
        coin, turn = tf.unstack(tf.random.stateless_uniform([2], seed=tf.stack([epoch, sample_id])))
        angle = (2 * turn - 1) * rot.degrees * np.pi / 180
        return tf.cond(coin < rot.p, lambda: rotate(x, angle), lambda: x)

    return augment


def tf_data_pure(folder: Path, wl: Workload, workers: int) -> Baseline:
    """No Python per sample: read whole files, decode, full per-sample shuffle, TF rotation.

    The shuffle needs every sample in its buffer before the first batch: tf.data's way of
    shuffling per sample, not a choice made here.
    """
    check_workers(workers)
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

    def shuffled(ids: tf.Tensor, rows: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The whole epoch in a stateless order from `epoch`: a full per-sample shuffle, as a
        buffer of every sample would give, that no global seed can change (`Dataset.shuffle`
        with a tensor seed breaks once `tf.random.set_seed(0)` has run in the process)."""
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(ids)[0]), seed=tf.stack([epoch, 0]))
        return tf.gather(ids, order), tf.gather(rows, order)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        def split(sample_id: tf.Tensor, row: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            x = tf.reshape(row[:-1], (wl.side, wl.side))
            return augment(x, epoch, sample_id), row[-1]

        return (tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
                .map(read_rows, num_parallel_calls=tf.data.AUTOTUNE)
                .unbatch()
                .enumerate()
                .batch(wl.samples)
                .map(lambda ids, rows: shuffled(ids, rows, epoch))
                .unbatch()
                .map(split, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(BATCH))

    ds = (tf.data.Dataset.range(1)
          .map(lambda _: epoch_var.read_value())
          .flat_map(one_epoch)
          .prefetch(tf.data.AUTOTUNE))
    kind = "tf.data pure TF (bilinear rotate)" if wl.augment else "tf.data pure TF"
    return make_baseline(f"{kind}, {count(workers, 'thread')}", _tf_epochs(_with_threads(ds, workers), epoch_var))


def _optional(module: str, package: str) -> ModuleType:
    """A bench module that needs an optional package, or BaselineUnavailable saying how to get it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != package:
            raise
        raise BaselineUnavailable(f"{package} is not installed: pip install {package}") from e


def grain_dataset(folder: Path, wl: Workload, workers: int) -> Baseline:
    return _optional("loader_server.tools.bench.grain_loader", "grain").grain_dataset(folder, wl, workers)


def grain_fit_loader(folder: Path, wl: Workload, workers: int) -> FitLoader:
    return _optional("loader_server.tools.bench.grain_loader", "grain").fit_loader(folder, wl, workers)


def _through_fit(key: str, folder: Path, wl: Workload, workers: int) -> Baseline:
    return through_fit(FIT_LOADERS[key](folder, wl, workers))


ALL: dict[str, Callable[[Path, Workload, int], Baseline]] = {
    "keras-threads": pydataset_threads,
    "keras-processes": pydataset_processes,
    "tf-numpy-function": tf_data_numpy_function,
    "tf-pure": tf_data_pure,
    "torch-per-sample": torch_loaders.torch_per_sample,
    "torch-batch": torch_loaders.torch_batch,
    "grain": grain_dataset,
}

# Loaders with a path through `model.fit` other than iterating them as they are (a tf.data
# dataset is what fit iterates): each gets a "<key>-fit" row. One entry adds one.
FIT_LOADERS: dict[str, Callable[[Path, Workload, int], FitLoader]] = {
    "keras-threads": partial(pydataset_fit_loader, use_multiprocessing=False),
    "keras-processes": partial(pydataset_fit_loader, use_multiprocessing=True),
    "torch-per-sample": partial(torch_loaders.fit_loader, per_sample=True),
    "torch-batch": partial(torch_loaders.fit_loader, per_sample=False),
    "grain": grain_fit_loader,
}
ALL.update({f"{key}-fit": partial(_through_fit, key) for key in FIT_LOADERS})
