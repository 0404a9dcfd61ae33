"""RemoteSequence, EpochSync and DataWaitMonitor on each Keras 3 backend: TensorFlow, JAX and
PyTorch. Keras reads KERAS_BACKEND once, at its first import, so each backend trains in a process
of its own (backend_trainer.py) against one real server serving the digits demo data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")
pytest.importorskip("sklearn", reason="the digits data comes from the demo extra: pip install -e '.[demo]'")

from loader_server.tools.demo_data import write_demo_data  # noqa: E402
from tests.helpers import read_epoch, run_bounded  # noqa: E402
from tests.live.keras_trainer import entry, read_record  # noqa: E402

TRAINER = Path(__file__).with_name("backend_trainer.py")
REPO = Path(__file__).resolve().parents[2]
TRAINER_TIMEOUT_S = 300
EPOCHS = 4
INITIAL_EPOCH = 1  # as a resumed run: server epoch = Keras epoch only holds if EpochSync works
CHANCE = 0.1       # ten digits
# A two-layer MLP reaches 0.88-0.93 after 4 epochs on every backend here; this leaves a wide
# margin for the unseeded start while still far above chance.
MIN_VAL_ACCURACY = 0.6
# the package each backend needs, and the extra that installs it
BACKEND_PACKAGES = {"tensorflow": ("tensorflow", "keras"), "jax": ("jax", "jax"), "torch": ("torch", "torch")}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_demo_data(out)
    return out / "loader.toml"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_fit_learns_on_each_keras_backend_with_epoch_sync_and_monitor(backend, start_server, digits, tmp_path):
    package, extra = BACKEND_PACKAGES[backend]
    pytest.importorskip(package, reason=f"Keras's {backend} backend needs {package}: pip install -e '.[{extra}]'")
    server = start_server("--config", str(digits))
    record, result_path = tmp_path / "record.jsonl", tmp_path / "result.json"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = run_bounded([sys.executable, str(TRAINER), server.endpoint, str(record), str(result_path),
                        "--epochs", str(EPOCHS), "--initial-epoch", str(INITIAL_EPOCH)],
                       TRAINER_TIMEOUT_S, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(result_path.read_text())

    assert result["backend"] == backend
    if backend != "tensorflow":
        assert not result["tensorflow_imported"], "training through RemoteSequence imported TensorFlow"
    accuracy = result["val_accuracy"]
    assert len(accuracy) == EPOCHS
    assert accuracy[-1] >= MIN_VAL_ACCURACY > CHANCE, accuracy

    # EpochSync: Keras epoch k read exactly server epoch k, every batch of it, for train
    last = INITIAL_EPOCH + EPOCHS
    assert result["epochs"] == {"train": last, "val": last}
    recorded = read_record(record)
    assert sorted(recorded) == list(range(INITIAL_EPOCH, last))
    for epoch in range(INITIAL_EPOCH, last):
        served = {i: entry(b) for i, b in enumerate(read_epoch(server.endpoint, epoch=epoch, dataset="train"))}
        assert recorded[epoch] == served, f"Keras epoch {epoch} did not read server epoch {epoch}"

    # DataWaitMonitor: one wait fraction per epoch, in the History that fit returned
    waits = result["data_wait_fraction"]
    assert len(waits) == EPOCHS and all(0.0 <= w <= 1.0 for w in waits), waits
