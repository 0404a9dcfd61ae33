"""What to install when an optional dependency is missing.

`import loader_client` and `BatchStream` need only numpy, pyzmq and msgpack; the Keras parts
(`RemoteSequence`, `EpochSync`, `DataWaitMonitor`) need Keras 3 with TensorFlow, the `keras`
extra. Python's own "No module named 'keras'" names neither the extra nor the interpreter it
looked in, and the second is often the surprise (a venv without TensorFlow, a notebook kernel).
"""

from __future__ import annotations

import sys

KERAS_MODULES = ("keras", "tensorflow")


def keras_missing(feature: str, error: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error to raise in place of `error` when importing Keras for `feature` failed, or
    `error` itself when the missing module is something else (a broken install says so)."""
    if (error.name or "").split(".")[0] not in KERAS_MODULES:
        return error
    return ModuleNotFoundError(
        f"{feature} needs Keras 3 with TensorFlow, and this Python ({sys.executable}) cannot import "
        f"{error.name!r}: install them with pip install 'npyloader[keras]' (or pip install tensorflow); "
        "loader_client.BatchStream reads batches without them", name=error.name)
