"""A trainer for test_backends.py: fits a small classifier through RemoteSequence on whatever
Keras backend KERAS_BACKEND names, in a process of its own, since Keras reads the variable once,
when it is first imported.

    KERAS_BACKEND=jax python backend_trainer.py URL RECORD RESULT [--epochs 4] [--initial-epoch 1]

It fits `train` with `validation_data=val`, `EpochSync` and `DataWaitMonitor`, starting at
`--initial-epoch` as a resumed run does, records every training batch Keras asks for in RECORD
(keras_trainer.BatchLog's lines), and writes RESULT, a JSON object: the backend Keras really
used, the validation accuracy of each epoch, the monitor's wait fractions, and the epoch each
sequence stands at afterwards, and whether TensorFlow was imported (no seed is set:
`keras.utils.set_random_seed` imports TensorFlow whenever it is installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras

from loader_client import DataWaitMonitor, EpochSync, RemoteSequence
from tests.live.keras_trainer import BatchLog, RecordedSequence

LEARNING_RATE = 0.01


def classifier(x_shape: tuple[int, ...], classes: int) -> keras.Model:
    model = keras.Sequential([keras.Input(x_shape), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(classes, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("record", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--initial-epoch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    log = BatchLog(args.record)
    with RecordedSequence(args.url, log, dataset="train", timeout=60) as train, \
            RemoteSequence(args.url, dataset="val", timeout=60) as val:
        model = classifier(train[0][0].shape[1:], args.classes)
        history = model.fit(train, validation_data=val, initial_epoch=args.initial_epoch,
                            epochs=args.initial_epoch + args.epochs, verbose=0,
                            callbacks=[EpochSync(train, val), DataWaitMonitor(train), log])
        args.result.write_text(json.dumps({
            "backend": keras.backend.backend(),
            "val_accuracy": history.history["val_accuracy"],
            "data_wait_fraction": history.history["data_wait_fraction"],
            "epochs": {"train": train.epoch, "val": val.epoch},
            "transport": train.stats()["transport"],
            "tensorflow_imported": "tensorflow" in sys.modules,
        }))


if __name__ == "__main__":
    main()
