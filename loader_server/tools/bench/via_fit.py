"""The "through fit" rows: a loader's batches as `model.fit` receives them on the TensorFlow backend.

A loader's own rate is not what training gets. `fit` wraps its input in a Keras data adapter
(PyDatasetAdapter, TorchDataLoaderAdapter, GrainDatasetAdapter, ...) and, on the TensorFlow
backend, iterates `adapter.get_tf_dataset()` through a `TFEpochIterator`: a tf.data pipeline fed
by a Python generator, each batch copied into tensors. This module builds that same
`TFEpochIterator`, with `shuffle=False` (the plan already shuffles samples; fit's default
`shuffle=True` would also reorder a PyDataset's batches), and pulls each step's batch as fit's
train step does, as tensors, then hands them over as numpy so the runner counts their bytes.

A tf.data.Dataset needs no such row: fit iterates it as given (TFDatasetAdapter returns it).
Adding a loader here is one FitLoader (see harness.py): what its user passes as `x`, and what
their Keras callback does at the start of each epoch.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TFEpochIterator

from loader_server.tools.bench.harness import (
    THROUGH_FIT,
    Baseline,
    BaselineUnavailable,
    FitLoader,
    make_baseline,
)
from loader_server.tools.bench.plan import Batch


def through_fit(loader: FitLoader) -> Baseline:
    """Epochs as fit runs them: one TFEpochIterator across consecutive epochs. An epoch asked for
    out of turn (after one was abandoned half-way) starts the loader afresh at that epoch."""
    if keras.backend.backend() != "tensorflow":
        raise BaselineUnavailable(f"the fit path is measured on the TensorFlow backend; KERAS_BACKEND is "
                                  f"{keras.backend.backend()}")
    state: dict[str, Any] = {"input": None, "iterator": None, "next_epoch": None}

    def begin(first_epoch: int) -> None:
        fit_input = loader.start(first_epoch)
        iterator = TFEpochIterator(x=fit_input.x, steps_per_epoch=fit_input.steps_per_epoch, shuffle=False,
                                   distribute_strategy=tf.distribute.get_strategy())
        iterator.reset()
        state.update(input=fit_input, iterator=iterator, next_epoch=first_epoch)

    def end() -> None:
        """What the end of fit leaves to the garbage collector, done now: the adapter's epoch end
        (a PyDataset's enqueuer stops), then the loader's own pools and processes."""
        if state["iterator"] is not None:
            state["iterator"].reset()
            state["input"].stop()
        state.update(input=None, iterator=None, next_epoch=None)

    def epoch(n: int) -> Generator[Batch, None, None]:
        if state["next_epoch"] != n:
            end()
            begin(n)
        state["next_epoch"] = None
        state["input"].on_epoch_begin(n)
        iterator = state["iterator"]
        with iterator.catch_stop_iteration():
            for _, _, steps in iterator:
                x, y = next(steps)
                yield x.numpy(), y.numpy()
        state["next_epoch"] = n + 1

    begin(0)
    return make_baseline(loader.name + THROUGH_FIT, epoch, end)
