"""Commands that run until stopped (serve, worker, stats --watch) stop on SIGINT and SIGTERM even
when started with both ignored, as a script's background job (`cmd &`) starts with SIGINT
ignored; and a server's workers do not inherit an ignored SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from loader_client import request_stats
from tests.helpers import (
    IGNORING_STOP_SIGNALS,
    ServerProcess,
    ignored_signals,
    launch,
    serve_command,
    wait_for,
)

STOP = [signal.SIGINT, signal.SIGTERM]


def test_the_prefix_starts_a_command_with_both_signals_ignored():
    probe = "import signal as s; print(*(s.getsignal(n) == s.SIG_IGN for n in (s.SIGINT, s.SIGTERM)))"
    out = subprocess.run([*IGNORING_STOP_SIGNALS, sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["True", "True"]


@pytest.mark.parametrize("sig", STOP, ids=lambda s: s.name)
def test_serve_started_ignoring_stop_signals_stops_on_one_and_its_workers_do_not_ignore_sigterm(
        start_server, id_dataset, sig):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", workers=2, prefix=IGNORING_STOP_SIGNALS)
    # local workers ignore SIGINT on purpose (their server stops them), never SIGTERM
    assert all(signal.SIGTERM not in ignored_signals(pid) for pid in server.workers()), "inherited, ignored"
    assert server.stop(sig, timeout=20) == 0
    assert "stopping" in server.log()


@pytest.mark.parametrize("sig", STOP, ids=lambda s: s.name)
def test_worker_started_ignoring_stop_signals_stops_on_one(start_server, start_worker, id_dataset, sig):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--worker-bind", "tcp://127.0.0.1:0",
                          workers=0)
    worker = start_worker(server.worker_endpoint, prefix=IGNORING_STOP_SIGNALS)
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 1, 30, "the worker to join")
    assert all(signal.SIGTERM not in ignored_signals(pid) for pid in worker.pids())
    assert worker.stop(sig, timeout=20) == 0


@pytest.mark.parametrize("sig", STOP, ids=lambda s: s.name)
def test_stats_watch_started_ignoring_stop_signals_stops_on_one(start_server, id_dataset, tmp_path, sig):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", workers=1)
    log_path = tmp_path / "watch.log"
    watch = ServerProcess(launch([*IGNORING_STOP_SIGNALS, *serve_command(
        "stats", server.endpoint, "--watch", "--interval", "0.2")], log_path), log_path)
    try:
        wait_for(lambda: watch.log().count("--- ") >= 2, 30, "two refreshes")
    finally:
        code = watch.stop(sig, timeout=20)
    assert code == 0, watch.log()[-2000:]
