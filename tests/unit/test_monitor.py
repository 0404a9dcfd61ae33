"""DataWaitMonitor's bookkeeping with a scripted sequence: no server, no fit (real fits against
real servers: tests/live/test_monitor.py)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

keras = pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")

from loader_client import DataWaitMonitor  # noqa: E402


class ScriptedSequence:
    """Stands in for a RemoteSequence: `stats()` answers from a script; the server never answers."""

    url = "tcp://127.0.0.1:9"
    dataset = "train"

    def __init__(self, script: list[tuple[float, int]]) -> None:
        self.script = list(script)

    def stats(self) -> dict:
        wait_s, nbytes = self.script.pop(0)
        return {"wait_s": wait_s, "bytes": nbytes}

    def server_stats(self, timeout: float) -> dict:
        raise TimeoutError(f"no answer from {self.url} within {timeout:g}s")


def test_wait_beyond_the_wall_time_is_clamped_and_a_silent_server_only_costs_the_diagnosis(caplog):
    monitor = DataWaitMonitor(ScriptedSequence([(0.0, 0), (1e6, 5000)]), warn_above=0.2)
    logs: dict = {}
    with caplog.at_level(logging.WARNING, logger="loader_client.monitor"):
        monitor.on_epoch_begin(0)
        monitor.on_epoch_end(0, logs)
    assert logs["data_wait_fraction"] == 1.0 and logs["data_bytes_per_s"] > 0
    [record] = caplog.records
    assert "waited for data 100% of epoch 1" in record.message
    assert "cause unknown: no stats from tcp://127.0.0.1:9" in record.message


def test_the_window_closes_where_validation_begins_and_keys_carry_the_name(caplog):
    seq = ScriptedSequence([(5.0, 100), (5.0, 100), (500.0, 9999)])
    monitor = DataWaitMonitor(seq, name="train_data")
    logs: dict = {}
    with caplog.at_level(logging.WARNING, logger="loader_client.monitor"):
        monitor.on_epoch_begin(3)
        monitor.on_test_begin()
        monitor.on_epoch_end(3, logs)
    assert logs == {"train_data_wait_fraction": 0.0, "train_data_bytes_per_s": 0.0}
    assert seq.script == [(500.0, 9999)], "validation's figures were not read into the epoch"
    assert not caplog.records
