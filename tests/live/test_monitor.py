"""DataWaitMonitor in real `model.fit` runs against real servers, throttled and not (its
bookkeeping with a scripted sequence: tests/unit/test_monitor.py; the diagnosis itself:
tests/unit/test_diagnose.py)."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")

from loader_client import DataWaitMonitor, RemoteSequence  # noqa: E402
from loader_client.diagnose import AUGMENTATION  # noqa: E402
from tests.helpers import serve_command  # noqa: E402

IMAGE = 48
SAMPLES = 1024
BATCH = 16
EPOCHS = 4


def test_server_stats_are_asked_with_the_sequences_own_curve_keys(start_server, id_dataset, tmp_path):
    """The monitor's diagnosis must work against a secured server, which ignores strangers."""
    for name in ("server", "trainer"):
        subprocess.run(serve_command("keygen", str(tmp_path / "keys"), "--name", name), check=True,
                       capture_output=True, timeout=60)
    (tmp_path / "authorized").mkdir()
    shutil.copy(tmp_path / "keys" / "trainer.key", tmp_path / "authorized")
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          "--curve-secret-key", str(tmp_path / "keys" / "server.key_secret"),
                          "--authorized-keys", str(tmp_path / "authorized"), workers=1)
    curve = (tmp_path / "keys" / "trainer.key_secret", tmp_path / "keys" / "server.key")
    with RemoteSequence(server.endpoint, timeout=30, curve=curve) as seq:
        assert seq.server_stats(timeout=5)["datasets"]["train"]["samples"] == 203


# -- real fits against real servers ----------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """48x48 float32 images with a binary label column: 64 batches of 16 per epoch."""
    rng = np.random.default_rng(0)
    x = rng.random((SAMPLES, IMAGE * IMAGE), dtype=np.float32)
    y = rng.integers(0, 2, SAMPLES).astype(np.float32)
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "images" / "part.npy", np.column_stack([x, y]))
    return tmp_path / "images"


def small_cnn():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((IMAGE, IMAGE, 1)), keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def serve_images(start_server, images: Path, workers: int, *augment: str):
    return start_server("--data", str(images), "--label-column", "-1", "--x-shape", f"{IMAGE},{IMAGE},1",
                        "--batch-size", str(BATCH), *augment, workers=workers)


class WaitRecorder(keras.callbacks.Callback):
    """Each epoch's wall time and the wait the sequence counted in it, read from the sequence's
    own totals and never clamped: the monitor clamps its fraction to 1, which would hide a client
    that over-counts its wait (say, by adding up Keras's loader threads, blocked at once)."""

    def __init__(self, seq: RemoteSequence) -> None:
        super().__init__()
        self.seq = seq
        self.epochs: list[tuple[float, float]] = []
        self._start: tuple[float, float] = (0.0, 0.0)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = (time.perf_counter(), self.seq.stats()["wait_s"])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        at, waited = self._start
        self.epochs.append((time.perf_counter() - at, self.seq.stats()["wait_s"] - waited))


def assert_waits_fit_in_their_epochs(recorded: list[tuple[float, float]]) -> None:
    """Training cannot wait for data longer than the epoch lasts. The margin covers a stretch
    of waiting that began just before the epoch's first reading and is counted when it ends."""
    assert len(recorded) == EPOCHS
    for wall, waited in recorded:
        assert 0 <= waited <= 1.05 * wall + 0.25, f"waited {waited:.2f}s in an epoch of {wall:.2f}s: {recorded}"


def fit_watched(endpoint: str, warn_above: float, *after) -> tuple[dict[str, list[float]], list[tuple[float, float]]]:
    """history.history of a fit watched by DataWaitMonitor, and each epoch's (wall, waited)."""
    with RemoteSequence(endpoint, timeout=60) as train:
        recorder = WaitRecorder(train)
        history = small_cnn().fit(train, epochs=EPOCHS, verbose=0,
                                  callbacks=[DataWaitMonitor(train, warn_above=warn_above), recorder, *after])
    return history.history, recorder.epochs


@pytest.mark.slow
def test_wait_fraction_and_rate_reach_history_and_callbacks_listed_after(start_server, images, tmp_path):
    """CSVLogger reads the epoch's logs in on_epoch_end, as TensorBoard does: listed after the
    monitor, both record its keys."""
    server = serve_images(start_server, images, 2)
    history, recorded = fit_watched(server.endpoint, 0.2, keras.callbacks.CSVLogger(str(tmp_path / "log.csv")))
    assert len(history["data_wait_fraction"]) == EPOCHS
    assert_waits_fit_in_their_epochs(recorded)
    epoch_bytes = SAMPLES * (IMAGE * IMAGE + 1) * 4
    assert all(r > epoch_bytes / 30 for r in history["data_bytes_per_s"]), "an epoch's bytes arrived within 30 s"
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["data_wait_fraction"]) for r in rows] == pytest.approx(history["data_wait_fraction"])
    assert [float(r["data_bytes_per_s"]) for r in rows] == pytest.approx(history["data_bytes_per_s"])


@pytest.mark.slow
def test_a_throttled_server_shows_a_higher_wait_and_one_warning_per_slow_epoch_naming_augmentation(
        start_server, images, caplog):
    warn_above = 0.15
    fast = serve_images(start_server, images, 2)
    unthrottled_history, unthrottled_recorded = fit_watched(fast.endpoint, warn_above)
    unthrottled = unthrottled_history["data_wait_fraction"]
    fast.stop()
    slow = serve_images(start_server, images, 1, "--augment", "rotate:degrees=30,p=1,order=3")
    caplog.clear()  # a busy machine can make even the unthrottled run wait now and then
    with caplog.at_level(logging.WARNING, logger="loader_client.monitor"):
        throttled_history, throttled_recorded = fit_watched(slow.endpoint, warn_above)
    throttled = throttled_history["data_wait_fraction"]
    print(f"wait fraction per epoch: unthrottled {[round(f, 2) for f in unthrottled]}, "
          f"throttled {[round(f, 2) for f in throttled]}; warnings: {[r.message for r in caplog.records]}")
    assert_waits_fit_in_their_epochs(unthrottled_recorded)
    assert_waits_fit_in_their_epochs(throttled_recorded)
    # the first epoch also traces the model, which hides waiting; compare the ones after it
    assert np.mean(throttled[1:]) > np.mean(unthrottled[1:]) + 0.1
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == sum(f > warn_above for f in throttled), "one line per epoch over the threshold"
    assert any(f"likely cause: {AUGMENTATION}" in w and "ms of augmentation per batch" in w for w in warnings), warnings
