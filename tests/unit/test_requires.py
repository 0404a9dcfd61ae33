"""Without Keras, the Keras parts of loader_client say what to install; BatchStream still imports.

`sys.modules[name] = None` is Python's own way of making `import name` fail as if it were not
installed (ModuleNotFoundError with `.name`); tests/deploy/test_wheel.py checks the same in a
venv where Keras really is absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loader_client.requires import keras_missing

ROOT = Path(__file__).resolve().parents[2]


def _without(module: str, code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(("name", "feature"), [("RemoteSequence", "RemoteSequence"), ("EpochSync", "EpochSync"),
                                               ("DataWaitMonitor", "DataWaitMonitor")])
def test_keras_parts_name_the_extra_to_install_when_keras_is_missing(name, feature):
    out = _without("keras", f"import loader_client\nfrom loader_client import BatchStream\nloader_client.{name}")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ") and feature in last
    assert "pip install 'npyloader[keras]'" in last and sys.executable in last and "'keras'" in last


def test_tensorflow_missing_under_keras_also_names_the_extra():
    error = keras_missing("RemoteSequence", ModuleNotFoundError("No module named 'tensorflow.python'",
                                                                name="tensorflow.python"))
    assert "pip install 'npyloader[keras]'" in str(error) and error.name == "tensorflow.python"


def test_another_missing_module_keeps_its_own_error():
    original = ModuleNotFoundError("No module named 'h5py'", name="h5py")
    assert keras_missing("RemoteSequence", original) is original
