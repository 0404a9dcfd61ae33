"""The benchmark's baseline loaders deliver npyloader's batch plan, and its ceilings measure.

A comparison is only fair if every loader does the same work: every sample once per epoch, in
a new per-sample order each epoch, each sample read from its row and augmented on its own. That
holds for each loader's row through `model.fit` too (the same batches, pulled through Keras's own
adapter). And a benchmark that leaves pools or processes behind skews whatever is measured after
it. The label column of the test files holds each row's global sample id, so a batch says which
samples it carries. torch and Grain are optional: their rows are skipped, saying why, without them.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from loader_server.tools.bench import ceilings as bench_ceilings
from loader_server.tools.bench import run as bench_run
from loader_server.tools.bench.baselines import (
    ALL,
    FIT_LOADERS,
    Baseline,
    BaselineUnavailable,
)
from loader_server.tools.bench.workload import Workload, write_files
from tests.helpers import children_but_resource_tracker

AUG = Workload("aug", 16, 256, ("rotate:degrees=15,p=0.5,order=3",))
IO = Workload("io", 16, 128, ())
WORKERS = 2
# Loaders that run the plan's own permutation and per-sample generators; tf.data pure TF uses
# TensorFlow's shuffle and coin instead, so only its coverage and rate of rotation are checked.
FOLLOWS_THE_PLAN = set(ALL) - {"tf-pure"}
# The adapter `fit` itself would wrap each loader's input in.
FIT_ADAPTERS = {"keras-threads": "PyDatasetAdapter", "keras-processes": "PyDatasetAdapter",
                "torch-per-sample": "TorchDataLoaderAdapter", "torch-batch": "TorchDataLoaderAdapter",
                "grain": "GrainDatasetAdapter"}

Batch = tuple[np.ndarray, np.ndarray]


def write_sample_ids(folder: Path) -> np.ndarray:
    """Overwrite each file's label column with global sample ids; return all rows in id order."""
    rows = []
    for path in sorted(folder.glob("*.npy")):
        data = np.load(path)
        start = sum(len(r) for r in rows)
        data[:, -1] = np.arange(start, start + len(data))
        np.save(path, data)
        rows.append(data)
    return np.concatenate(rows)


def own_children() -> set[int]:
    """Child processes of this test process, less multiprocessing's interpreter-wide resource tracker."""
    return set(children_but_resource_tracker(os.getpid()))


def labels(batches: list[Batch]) -> np.ndarray:
    return np.concatenate([y for _, y in batches]).astype(np.int64)


def build(key: str, folder: Path, wl: Workload) -> Baseline:
    try:
        return ALL[key](folder, wl, WORKERS)
    except BaselineUnavailable as e:
        pytest.skip(str(e))


def test_the_runner_measures_every_baseline_and_each_fit_row():
    assert sorted(bench_run.BASELINES) == sorted(ALL)
    assert {f"{key}-fit" for key in FIT_LOADERS} <= set(ALL)
    assert set(FIT_ADAPTERS) == set(FIT_LOADERS)


@dataclass
class Run:
    """Epochs 0 and 1 in full, then epoch 2 closed after its first batch, and what was left."""

    key: str
    name: str
    epochs: dict[int, list[Batch]]
    rows: np.ndarray
    abandoned_epoch_ended: bool
    children_left: set[int]
    active_children_left: list
    epoch_after_close_refused: bool


@pytest.fixture(scope="module")
def aug_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("aug")
    write_files(folder, AUG)
    return folder, write_sample_ids(folder)


@pytest.fixture(scope="module", params=sorted(ALL))
def run(request: pytest.FixtureRequest, aug_rows: tuple[Path, np.ndarray]) -> Run:
    folder, rows = aug_rows
    before = own_children()
    baseline = build(request.param, folder, AUG)
    try:
        epochs = {e: list(baseline.epoch(e)) for e in (0, 1)}
        abandoned = baseline.epoch(2)
        next(abandoned)
    finally:
        baseline.close()
    baseline.close()
    try:
        baseline.epoch(3)
        refused = False
    except RuntimeError:
        refused = True
    return Run(request.param, baseline.name, epochs, rows, next(abandoned, None) is None,
               own_children() - before, multiprocessing.active_children(), refused)


def test_an_epoch_is_every_batch_of_the_workload_shape(run: Run):
    for batches in run.epochs.values():
        assert len(batches) == AUG.samples // 64
        for x, y in batches:
            assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
            assert (x.shape, x.dtype, y.shape, y.dtype) == ((64, 16, 16), np.float32, (64,), np.float32)


def test_every_sample_is_delivered_exactly_once_per_epoch(run: Run):
    for batches in run.epochs.values():
        assert sorted(labels(batches)) == list(range(AUG.samples))


def test_each_epoch_has_its_own_order(run: Run):
    assert not np.array_equal(labels(run.epochs[0]), labels(run.epochs[1]))


@pytest.mark.parametrize("run", sorted(FOLLOWS_THE_PLAN), indirect=True)
def test_batches_follow_the_plans_permutation_and_rotation(run: Run):
    """tf-pure is left out: it shuffles and rotates with TensorFlow's own randomness."""
    for epoch, batches in run.epochs.items():
        assert np.array_equal(labels(batches), np.random.default_rng(epoch).permutation(AUG.samples))
        for x, y in batches:
            for sample, sample_id in zip(x, y.astype(np.int64)):
                expected = run.rows[sample_id, :-1].reshape(16, 16)
                rng = np.random.default_rng([epoch, sample_id])
                if rng.random() < 0.5:
                    expected = ndimage.rotate(expected, rng.uniform(-15, 15), reshape=False)
                np.testing.assert_array_equal(sample, expected)


def test_about_half_of_the_samples_are_rotated(run: Run):
    for batches in run.epochs.values():
        unchanged = sum(np.array_equal(sample, run.rows[i, :-1].reshape(16, 16))
                        for x, y in batches for sample, i in zip(x, y.astype(np.int64)))
        assert AUG.samples * 0.25 < unchanged < AUG.samples * 0.75


def test_close_ends_the_open_epoch_and_leaves_no_process_behind(run: Run):
    assert run.abandoned_epoch_ended
    assert run.children_left == set()
    assert run.active_children_left == []
    assert run.epoch_after_close_refused


def test_names_say_the_worker_count(run: Run):
    assert f"{WORKERS} " in run.name
    assert ("bilinear" in run.name) == (run.key == "tf-pure")
    assert run.name.endswith(", through fit") == run.key.endswith("-fit")


@pytest.mark.parametrize("key", sorted(FIT_LOADERS))
def test_each_fit_row_hands_fit_what_fit_wraps_in_that_loaders_own_adapter(key: str, aug_rows: tuple[Path, np.ndarray]):
    """The row through fit measures Keras's real adapter for the loader, not a stand-in."""
    from keras.src.trainers.data_adapters import get_data_adapter

    before = own_children()
    try:
        loader = FIT_LOADERS[key](aug_rows[0], AUG, WORKERS)
    except BaselineUnavailable as e:
        pytest.skip(str(e))
    fit_input = loader.start(0)
    try:
        adapter = get_data_adapter(fit_input.x, steps_per_epoch=fit_input.steps_per_epoch, shuffle=False)
        assert type(adapter).__name__ == FIT_ADAPTERS[key]
    finally:
        fit_input.stop()
    assert own_children() - before == set()


@pytest.mark.parametrize("key", sorted(ALL))
def test_without_augmentation_samples_are_the_rows_unchanged(key: str, tmp_path: Path):
    write_files(tmp_path, IO)
    rows = write_sample_ids(tmp_path)
    baseline = build(key, tmp_path, IO)
    try:
        batches = list(baseline.epoch(0))
    finally:
        baseline.close()
    assert "bilinear" not in baseline.name
    assert sorted(labels(batches)) == list(range(IO.samples))
    for x, y in batches:
        np.testing.assert_array_equal(x, rows[y.astype(np.int64), :-1].reshape(-1, 16, 16))


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_raw_zmq_ceiling_is_a_rate_and_leaves_nothing_behind(transport: str):
    temp_dirs = set(Path(tempfile.gettempdir()).glob("npyloader-ceiling-*"))
    before = own_children()
    rate = bench_ceilings.raw_zmq(transport, 1 << 20, seconds=0.3)
    assert np.isfinite(rate) and rate > 0
    assert multiprocessing.active_children() == []
    assert own_children() - before == set()
    assert set(Path(tempfile.gettempdir()).glob("npyloader-ceiling-*")) == temp_dirs


def test_raw_zmq_rejects_an_unknown_transport():
    with pytest.raises(ValueError, match="tcp' or 'ipc"):
        bench_ceilings.raw_zmq("udp", 1024, seconds=0.1)


def test_memcpy_ceiling_is_a_rate():
    rate = bench_ceilings.memcpy(1 << 20, seconds=0.3)
    assert np.isfinite(rate) and rate > 0
