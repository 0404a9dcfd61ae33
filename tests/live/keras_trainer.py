"""A trainer for the resume tests in test_keras.py, run in its own process so that a test can
kill it with SIGKILL, as a preempted machine would, and start it again.

    python keras_trainer.py URL RECORD BACKUP_DIR [--epochs 4] [--stall-in-epoch K]

It fits a small model on `RemoteSequence(URL)` with `BackupAndRestore(BACKUP_DIR)` and
`EpochSync`, and appends one JSON line to RECORD for every batch Keras asks for:
`{"epoch": Keras epoch, "index": batch index, "ids": sample ids, "x": digest of x}`.
`--stall-in-epoch K` stands for a trainer preempted in the middle of epoch K: a few batches
into it, training stops making progress until the test kills it, so the kill lands mid-epoch
however fast or slow the machine runs.

The test imports the recording pieces too, to fit in its own process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from loader_client import EpochSync, RemoteSequence  # noqa: E402

STALL_AFTER_BATCHES = 3

# what one batch was: its sample ids and a digest of its features
Entry = tuple[tuple[int, ...], str]


def entry(batch: tuple[np.ndarray, ...]) -> Entry:
    """The ids (the label column of an id dataset) and a digest of x, which an augmentation
    seeded by (seed, epoch, sample id) makes differ from one epoch to the next."""
    x, y = batch[0], batch[1]
    return tuple(y.astype(int).tolist()), hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


class BatchLog(keras.callbacks.Callback):
    """Writes each batch its sequence serves as a line, tagged with the Keras epoch that asked
    for it. The epoch is set in `on_epoch_begin`, which Keras calls before its loader threads
    start, and cleared in `on_epoch_end`: the batches Keras reads before the first epoch, to
    learn their shapes, belong to no epoch and are not written."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.epoch: int | None = None
        self._lock = threading.Lock()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = None

    def write(self, index: int, batch: tuple[np.ndarray, ...]) -> None:
        """Called from Keras's loader threads; one whole line per write, flushed at once, so a
        killed trainer leaves every batch it read on record."""
        if self.epoch is None:
            return
        ids, digest = entry(batch)
        line = json.dumps({"epoch": self.epoch, "index": index, "ids": ids, "x": digest}) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)


class RecordedSequence(RemoteSequence):
    """A RemoteSequence that hands every batch it serves to a BatchLog."""

    def __init__(self, url: str, log: BatchLog, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.log = log

    def __getitem__(self, index: int) -> Any:
        batch = super().__getitem__(index)
        self.log.write(index, batch)
        return batch


class Stall(keras.callbacks.Callback):
    """A trainer preempted in the middle of `epoch`: no progress after a few of its batches."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch
        self._current = -1

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._current == self.epoch and batch == STALL_AFTER_BATCHES:
            threading.Event().wait()


def read_record(path: Path) -> dict[int, dict[int, Entry]]:
    """{Keras epoch: {batch index: entry}} of a record. A batch read twice in one epoch (the
    element-spec reads of a validation sequence come again in its pass) must be the same bytes."""
    epochs: dict[int, dict[int, Entry]] = {}
    if not path.exists():
        return epochs
    text = path.read_text()
    for line in text[:text.rfind("\n") + 1].splitlines():  # a line cut by SIGKILL is not a batch
        row = json.loads(line)
        seen = epochs.setdefault(row["epoch"], {})
        got = (tuple(row["ids"]), row["x"])
        assert seen.setdefault(row["index"], got) == got, f"batch {row['index']} of epoch {row['epoch']} changed"
    return epochs


def tiny_model() -> keras.Model:
    """Built by its Input, as BackupAndRestore requires before fit."""
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("record", type=Path)
    parser.add_argument("backup_dir")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stall-in-epoch", type=int)
    args = parser.parse_args()
    log = BatchLog(args.record)
    with RecordedSequence(args.url, log, timeout=30) as seq:
        callbacks = [EpochSync(seq), log, keras.callbacks.BackupAndRestore(args.backup_dir)]
        if args.stall_in_epoch is not None:
            callbacks.append(Stall(args.stall_in_epoch))
        tiny_model().fit(seq, epochs=args.epochs, shuffle=True, verbose=0, callbacks=callbacks)


if __name__ == "__main__":
    main()
