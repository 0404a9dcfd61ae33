"""Progress lines: silent for quick work, periodic with count, rate and time left for long work."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from loader_server import progress
from loader_server.config import DatasetConfig
from loader_server.data.index import build_index
from loader_server.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_quick_work_logs_nothing(clock, caplog):
    caplog.set_level(logging.INFO, logger="npyloader")
    with Progress("reading", 10, "files") as p:
        for _ in range(10):
            clock.now += 0.1
            p.advance()
    assert caplog.messages == []


def test_long_work_logs_count_rate_and_time_left_then_done(clock, caplog):
    caplog.set_level(logging.INFO, logger="npyloader")
    with Progress("reading", 100, "files", every_s=2.0) as p:
        for _ in range(100):
            clock.now += 0.1
            p.advance()
    first = caplog.messages[0]
    assert first == "reading: 20 of 100 files (20%), 10/s, about 8 s left"
    assert len(caplog.messages) == 6, caplog.messages  # at 2, 4, 6, 8, 10 s, and done
    assert caplog.messages[-1] == "reading: done, 100 files in 10.0 s"


def test_indexing_many_files_reports_progress(tmp_path, caplog, monkeypatch):
    for i in range(50):
        np.save(tmp_path / f"s{i:03d}.npy", np.zeros((4,), np.float32))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="npyloader")
    build_index(DatasetConfig(data=(str(tmp_path),), layout="per-sample"))
    lines = [m for m in caplog.messages if m.startswith("indexing: reading .npy headers")]
    assert lines[-1].startswith("indexing: reading .npy headers: done, 50 files in")
    assert "50 of 50 files (100%)" in lines[-2]
