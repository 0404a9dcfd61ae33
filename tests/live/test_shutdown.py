"""Graceful shutdown: SIGTERM delivers the batches in progress, leaves nothing behind, and the
server can start again on the same ports at once; a killed server's leftovers are cleared."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loader_client import BatchStream
from tests.helpers import (
    PAUSE_OP,
    batch_ids,
    free_port,
    tasks_in_progress,
    wait_for,
    write_id_dataset,
)


@pytest.fixture
def slow_op(augment_package: Callable[[str, str], str]) -> str:
    """An augment op that sleeps per sample, so batches are in progress when a signal comes."""
    return f"{augment_package('slowpkg', PAUSE_OP)}:pause"


def npyloader_segments(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"npyloader-{pid}-")]


@pytest.mark.slow
def test_sigterm_delivers_batches_in_progress_then_restarts_on_the_same_port_at_once(start_server, tmp_path, slow_op):
    folder = tmp_path / "d"
    n = write_id_dataset(folder, [40, 40, 40])
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    args = ("--data", str(folder), "--label-column", "-1", "--batch-size", "8", "--augment", f"{slow_op}:seconds=0.05",
            "--bind", f"tcp://127.0.0.1:{free_port()}")
    first = start_server(*args, workers=2, env={"TMPDIR": str(private_tmp)})
    assert len(os.listdir(private_tmp)) == 1, "the server's ipc folder lives in its TMPDIR"
    assert npyloader_segments(first.proc.pid), "batch slots are named after the server's pid"
    got: list[int] = []
    with BatchStream(first.endpoint, timeout=60, prefetch=8) as stream:
        batches = iter(stream)
        got += batch_ids(next(batches))
        wait_for(lambda: tasks_in_progress(first.endpoint) >= 2, 20, "batches in progress on the workers")
        received_before = stream.stats()["batches"]
        started = time.monotonic()
        assert first.stop(signal.SIGTERM, timeout=20) == 0
        assert time.monotonic() - started < 15, "stopped within the drain deadline"
        log = first.log()
        assert "draining: delivering" in log, log[-2000:]
        drained = int(log.split("drained ")[1].split()[0])
        assert drained >= 1 and "left undelivered" not in log, log[-2000:]
        wait_for(lambda: stream.stats()["batches"] >= received_before + drained, 10,
                 "the drained batches to reach the client")
        assert os.listdir(private_tmp) == [], "no ipc socket folder left behind"
        assert npyloader_segments(first.proc.pid) == [], "no shared memory left behind"

        start_server(*args, workers=2, env={"TMPDIR": str(private_tmp)})
        got += [i for batch in batches for i in batch_ids(batch)]
        assert stream.stats()["reconnects"] == 1
    assert sorted(got) == list(range(n)), "nothing lost, nothing repeated across the restart"


# `--drain-timeout`'s default (README: "for at most --drain-timeout, 10 s by default").
DEFAULT_DRAIN_S = 10.0


@contextmanager
def batches_in_progress(start_server, folder: Path, slow_op: str, drain_timeout: str,
                        seconds_per_sample: float = 1.0) -> Iterator:
    """A server whose one worker is building slow batches (8 samples each) a client asked for."""
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "8",
                          "--augment", f"{slow_op}:seconds={seconds_per_sample}", "--drain-timeout", drain_timeout,
                          workers=1)
    with BatchStream(server.endpoint, timeout=60, prefetch=4) as stream:
        stream._conn.request(0, [0, 1, 2, 3])
        wait_for(lambda: tasks_in_progress(server.endpoint) >= 1, 20, "a batch in progress")
        yield server


def test_a_second_signal_cuts_the_drain_short(start_server, id_dataset, slow_op):
    with batches_in_progress(start_server, id_dataset[0], slow_op, drain_timeout="120") as server:
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining: delivering" in server.log(), 10, "the drain to start")
        started = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=20) == 0
        assert time.monotonic() - started < 10, "the second signal did not wait out 120 s of drain"


def test_drain_timeout_zero_stops_without_waiting(start_server, id_dataset, slow_op):
    """The batch in progress needs 24 s more, so a server that drained anyway would take the
    whole default drain (10 s) to stop; with 0 it stops well within that (its worker, which
    cannot hear the stop mid-batch, is terminated after the pool's own grace period)."""
    with batches_in_progress(start_server, id_dataset[0], slow_op, drain_timeout="0", seconds_per_sample=3) as server:
        started = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=30) == 0
        elapsed = time.monotonic() - started
    assert "left undelivered" in server.log()
    assert elapsed < DEFAULT_DRAIN_S, f"stopping took {elapsed:.1f}s, as long as a drain"


def test_a_killed_servers_ipc_folder_is_removed_by_the_next_start(start_server, id_dataset, tmp_path):
    folder, n = id_dataset
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    args = ("--data", str(folder), "--label-column", "-1")
    killed = start_server(*args, workers=1, env={"TMPDIR": str(private_tmp)})
    left = os.listdir(private_tmp)
    killed.stop(signal.SIGKILL)
    assert os.listdir(private_tmp) == left, "SIGKILL gives no chance to clean up"
    wait_for(lambda: npyloader_segments(killed.proc.pid) == [], 20,
             "multiprocessing's resource tracker to unlink the killed server's shared memory")

    server = start_server(*args, workers=1, env={"TMPDIR": str(private_tmp)})
    assert left[0] not in os.listdir(private_tmp)
    assert f"left behind by a server (pid {killed.proc.pid}) that was killed" in server.log()
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert sorted(i for batch in stream for i in batch_ids(batch)) == list(range(n))


def test_a_tmpdir_too_long_for_an_ipc_socket_falls_back_to_tmp(start_server, id_dataset, tmp_path):
    folder, n = id_dataset
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    server = start_server("--data", str(folder), "--label-column", "-1", workers=1, env={"TMPDIR": str(deep)})
    assert f"TMPDIR {deep} is too long for an ipc socket path; using /tmp" in server.log()
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert sorted(i for batch in stream for i in batch_ids(batch)) == list(range(n))
