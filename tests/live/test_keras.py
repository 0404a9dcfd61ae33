"""RemoteSequence under real Keras 3: fit with shuffled batch order, evaluate, predict, tf.data."""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")

from loader_client import BatchStream, RemoteSequence  # noqa: E402


class RecordingSequence(RemoteSequence):
    """Records what Keras asked for inside each epoch (not the spec probe before the first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs: list[list[tuple[int, list[int]]]] = []
        self._recording = False

    def on_epoch_begin(self):
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
        assert seq.stats()["epoch"] == 4, "Keras's reset() calls on_epoch_end once before the first epoch"


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


def test_use_multiprocessing_is_refused_with_the_reason(start_server, id_dataset):
    server, _ = ids_server(start_server, id_dataset)
    with pytest.raises(ValueError, match="fork the training process"):
        RemoteSequence(server.endpoint, use_multiprocessing=True)


def test_remote_sequence_times_out_naming_a_dead_endpoint():
    with pytest.raises(TimeoutError, match="tcp://127.0.0.1:9"):
        RemoteSequence("tcp://127.0.0.1:9", timeout=0.5)
