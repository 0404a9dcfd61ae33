"""RemoteSequence under real Keras 3: fit with shuffled batch order, evaluate, predict, tf.data;
server epoch = Keras epoch, also in a run resumed after its trainer was killed."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")

from loader_client import BatchStream, EpochSync, RemoteSequence  # noqa: E402
from tests.helpers import kill_group, launch, read_epoch, run_bounded, wait_for  # noqa: E402
from tests.live.keras_trainer import (  # noqa: E402
    BatchLog,
    Entry,
    RecordedSequence,
    entry,
    read_record,
)

TRAINER = Path(__file__).with_name("keras_trainer.py")
REPO = Path(__file__).resolve().parents[2]
TRAINER_TIMEOUT_S = 180
# each sample's noise comes from (seed, epoch, sample id): every epoch is different bytes
AUGMENT = ("--augment", "noise:std=0.5")


class RecordingSequence(RemoteSequence):
    """Records what Keras asked for inside each epoch (not the spec probe before the first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs: list[list[tuple[int, list[int]]]] = []
        self._recording = False

    def on_epoch_begin(self):
        super().on_epoch_begin()
        self.epochs.append([])
        self._recording = True

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        if self._recording:
            self.epochs[-1].append((index, y.astype(int).tolist()))
        return x, y

    def on_epoch_end(self):
        self._recording = False
        super().on_epoch_end()


def tiny_model(features: int = 16):
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def ids_server(start_server, id_dataset, *extra):
    folder, n = id_dataset
    return start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16", *extra), n


def served_ids(url: str, epoch: int) -> dict[int, list[int]]:
    """{batch index: sample ids} of one server epoch, read with BatchStream."""
    return {i: y.astype(int).tolist() for i, (_, y) in enumerate(read_epoch(url, epoch=epoch))}


def test_fit_with_shuffled_batch_order_gets_every_batch_exactly_once(start_server, id_dataset):
    server, n = ids_server(start_server, id_dataset)
    with RecordingSequence(server.endpoint, timeout=30) as seq:
        tiny_model().fit(seq, epochs=3, shuffle=True, verbose=0)
        assert len(seq.epochs) == 3
        for calls in seq.epochs:
            indices = [i for i, _ in calls]
            assert sorted(indices) == list(range(13)), "each batch index exactly once"
            ids = sorted(sum((ids for _, ids in calls), []))
            assert ids == list(range(n)), "each sample exactly once"
        assert any([i for i, _ in calls] != list(range(13)) for calls in seq.epochs), "Keras shuffled the order"
        for epoch, calls in enumerate(seq.epochs):
            assert dict(calls) == served_ids(server.endpoint, epoch), f"Keras epoch {epoch} read server epoch {epoch}"
        assert seq.stats()["epoch"] == 3, "Keras's reset before fit (an on_epoch_end alone) is not a pass"


def test_seq_index_is_batch_index_of_the_servers_plan(start_server, id_dataset):
    server, _ = ids_server(start_server, id_dataset)
    with BatchStream(server.endpoint, epoch=1, timeout=30) as stream:
        expected = [y.astype(int).tolist() for _, y in stream]
    with RemoteSequence(server.endpoint, timeout=30, epoch=1) as seq:
        for i in (7, 0, 12, 3, 7):
            assert seq[i][1].astype(int).tolist() == expected[i]


def test_fit_then_evaluate_learns_a_real_task(start_server, tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 600), ("val", 200)):
        (tmp_path / split).mkdir()
        x = rng.normal(size=(count, 8)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
        np.save(tmp_path / split / "part.npy", np.column_stack([x, y]))
    (tmp_path / "loader.toml").write_text(
        '[datasets.train]\ndata = "train"\nlabel_column = -1\nbatch_size = 32\n'
        '[datasets.val]\ndata = "val"\nlabel_column = -1\nbatch_size = 64\nshuffle = false\n')
    server = start_server("--config", str(tmp_path / "loader.toml"))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
    started = time.monotonic()
    with RemoteSequence(server.endpoint, "train") as train, RemoteSequence(server.endpoint, "val") as val:
        history = model.fit(train, validation_data=val, epochs=6, verbose=0)
        loss, accuracy = model.evaluate(val, verbose=0)
        stats = train.stats()
    lived = time.monotonic() - started
    assert accuracy > 0.9 and history.history["val_accuracy"][-1] > 0.9
    assert stats["batches"] >= 6 * 19 and stats["bytes"] > 0
    # wait_s is wall time with no batch ready, so it cannot exceed the sequence's life; adding up
    # the waits of Keras's several loader threads, each blocked at once, would
    assert stats["wait_s"] <= lived, f"waited {stats['wait_s']:.2f}s in {lived:.2f}s"


def test_predict_returns_batches_in_index_order(start_server, id_dataset):
    server, n = ids_server(start_server, id_dataset)
    with BatchStream(server.endpoint, epoch=0, timeout=30) as stream:
        expected = np.concatenate([x[:, 0] for x, _ in stream])
    pick_first = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1, use_bias=False)])
    kernel = np.zeros((16, 1), np.float32)
    kernel[0, 0] = 1.0
    pick_first.layers[0].set_weights([kernel])
    with RemoteSequence(server.endpoint, timeout=30) as seq:
        predicted = pick_first.predict(seq, verbose=0)[:, 0]
    np.testing.assert_array_equal(predicted, expected)
    assert len(predicted) == n


def test_evaluate_and_predict_each_read_one_server_epoch(start_server, id_dataset):
    """Each pass reads every batch of one epoch once, then moves on; the order Keras hands them
    on in is test_predict_returns_batches_in_index_order's (its loader threads finish out of order)."""
    server, _ = ids_server(start_server, id_dataset)
    with RecordingSequence(server.endpoint, timeout=30) as seq:
        model = tiny_model()
        model.evaluate(seq, verbose=0)
        model.predict(seq, verbose=0)
        assert seq.stats()["epoch"] == 2
    assert len(seq.epochs) == 2
    for epoch, calls in enumerate(seq.epochs):
        assert sorted(i for i, _ in calls) == list(range(13)), "each batch index exactly once"
        assert dict(calls) == served_ids(server.endpoint, epoch), f"pass {epoch} read server epoch {epoch}"


def test_as_tf_dataset_has_the_right_element_spec_and_one_epoch_per_pass(start_server, id_dataset):
    import tensorflow as tf

    server, n = ids_server(start_server, id_dataset)
    with RemoteSequence(server.endpoint, timeout=30) as seq:
        ds = seq.as_tf_dataset()
        x_spec, y_spec = ds.element_spec
        assert x_spec == tf.TensorSpec((None, 16), tf.float32) and y_spec == tf.TensorSpec((None,), tf.float32)
        for epoch in range(2):
            ids = sorted(int(v) for _, y in ds for v in y.numpy())
            assert ids == list(range(n))
        assert seq.stats()["epoch"] == 2


def served_epochs(url: str, epochs: range) -> dict[int, dict[int, Entry]]:
    """{epoch: {batch index: entry}} as BatchStream reads the server's epochs."""
    return {e: {i: entry(batch) for i, batch in enumerate(read_epoch(url, epoch=e))} for e in epochs}


def fit_recorded(url: str, folder: Path, **fit_kwargs: object) -> tuple[dict, dict]:
    """fit a fresh model with EpochSync on a training and a validation sequence (the same
    augmented, shuffled dataset); the record of each, {Keras epoch: {batch index: entry}}."""
    folder.mkdir()
    train_log, val_log = BatchLog(folder / "train.jsonl"), BatchLog(folder / "val.jsonl")
    with RecordedSequence(url, train_log, timeout=30) as train, RecordedSequence(url, val_log, timeout=30) as val:
        tiny_model().fit(train, validation_data=val, shuffle=True, verbose=0,
                         callbacks=[EpochSync(train, val), train_log, val_log], **fit_kwargs)
    return read_record(train_log.path), read_record(val_log.path)


def test_fit_from_initial_epoch_reads_the_epochs_an_uninterrupted_run_reads(start_server, id_dataset, tmp_path):
    server, _ = ids_server(start_server, id_dataset, *AUGMENT)
    train, val = fit_recorded(server.endpoint, tmp_path / "whole", epochs=4)
    served = served_epochs(server.endpoint, range(4))
    assert train == served, "training: server epoch = Keras epoch, every batch of it"
    assert val == served, "validation after Keras epoch k reads server epoch k"
    assert len({frozenset(e.values()) for e in served.values()}) == 4, "every epoch is different bytes"
    train_resumed, val_resumed = fit_recorded(server.endpoint, tmp_path / "resumed", epochs=4, initial_epoch=2)
    assert train_resumed == {2: train[2], 3: train[3]}
    assert val_resumed == {2: val[2], 3: val[3]}


def trainer(url: str, record: Path, backup_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, str(TRAINER), url, str(record), str(backup_dir), *flags]


def trainer_env() -> dict[str, str]:
    """The trainer imports loader_client from this checkout, as the tests do."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}


def train_to_the_end(url: str, record: Path, backup_dir: Path) -> None:
    done = run_bounded(trainer(url, record, backup_dir), TRAINER_TIMEOUT_S, env={**os.environ, **trainer_env()})
    assert done.returncode == 0, f"the trainer failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def train_until_killed_in(epoch: int, url: str, record: Path, backup_dir: Path, log_path: Path) -> None:
    """Start the trainer, wait until it reads batches of Keras epoch `epoch` (it stalls a few
    batches in, so it cannot have finished the epoch), and kill it with SIGKILL."""
    proc = launch(trainer(url, record, backup_dir, "--stall-in-epoch", str(epoch)), log_path, trainer_env())
    try:
        def in_epoch() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the trainer exited ({proc.returncode}) before epoch {epoch}:\n"
                                     f"{log_path.read_text()[-4000:]}")
            return epoch in read_record(record)

        wait_for(in_epoch, TRAINER_TIMEOUT_S, f"the trainer to start Keras epoch {epoch}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        kill_group(proc)


def test_a_trainer_killed_mid_epoch_resumes_with_backup_and_restore_reading_the_same_batches(
        start_server, id_dataset, tmp_path):
    """A preempted trainer: killed in epoch 2 of fit(epochs=4), started again with the same
    BackupAndRestore folder, it resumes at epoch 2 and reads, in each Keras epoch, exactly the
    batches an uninterrupted run read there."""
    server, _ = ids_server(start_server, id_dataset, *AUGMENT)
    train_to_the_end(server.endpoint, tmp_path / "whole.jsonl", tmp_path / "whole-backup")
    whole = read_record(tmp_path / "whole.jsonl")
    assert whole == served_epochs(server.endpoint, range(4)), "server epoch = Keras epoch, every batch of it"

    backup = tmp_path / "backup"
    train_until_killed_in(2, server.endpoint, tmp_path / "killed.jsonl", backup, tmp_path / "killed.log")
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2, "backed up after epoch 1"
    killed = read_record(tmp_path / "killed.jsonl")
    assert {0: killed[0], 1: killed[1]} == {0: whole[0], 1: whole[1]}
    assert killed[2].items() <= whole[2].items(), "the part of epoch 2 read before the kill"

    train_to_the_end(server.endpoint, tmp_path / "resumed.jsonl", backup)
    assert read_record(tmp_path / "resumed.jsonl") == {2: whole[2], 3: whole[3]}


def test_use_multiprocessing_is_refused_with_the_reason(start_server, id_dataset):
    server, _ = ids_server(start_server, id_dataset)
    with pytest.raises(ValueError, match="fork the training process"):
        RemoteSequence(server.endpoint, use_multiprocessing=True)


def test_remote_sequence_times_out_naming_a_dead_endpoint():
    with pytest.raises(TimeoutError, match="tcp://127.0.0.1:9"):
        RemoteSequence("tcp://127.0.0.1:9", timeout=0.5)
