"""Start-up over many one-sample files: workers start while the server indexes, and still serve
exactly the right bytes once they get the index."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from loader_client import BatchStream

FILES = 20_000  # enough that indexing takes a tenth of a second or more, well over /proc's clock ticks
INDEXED = re.compile(r"^(\S+ \S+) \S+ INFO dataset 'train': \d+ samples from", re.MULTILINE)


def started_at(pid: int) -> float:
    """When a process started, in seconds since the epoch (to a clock tick or two)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        booted = time.time() - float(f.read().split()[0])
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def logged_at(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_workers_started_before_the_index_exists_serve_the_right_bytes(start_server, tmp_path: Path):
    folder = tmp_path / "scans"
    folder.mkdir()
    sample = np.zeros((2, 3), np.float32)
    for i in range(FILES):
        sample[:] = i
        np.save(folder / f"s{i:05d}.npy", sample)
    np.save(tmp_path / "labels.npy", np.arange(FILES, dtype=np.int64) * 2)
    server = start_server("--data", str(folder), "--layout", "per-sample", "--labels", str(tmp_path / "labels.npy"),
                          "--batch-size", "1000", "--no-index-cache", workers=2)

    indexed = logged_at(INDEXED.search(server.log()).group(1))
    for pid in server.workers():
        assert started_at(pid) < indexed, "a worker started only after the index was built"
    with BatchStream(server.endpoint, timeout=60) as stream:
        batches = [(x.copy(), y.copy()) for x, y in stream]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (FILES, 2, 3)
    np.testing.assert_array_equal(x, np.broadcast_to(x[:, :1, :1], x.shape))
    np.testing.assert_array_equal(y, x[:, 0, 0].astype(np.int64) * 2)
    assert sorted(y.tolist()) == list(range(0, 2 * FILES, 2))
