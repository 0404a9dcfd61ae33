"""Helpers shared by every test folder: waiting on conditions, processes read from /proc, the
`npyloader` subprocesses tests start, data writers, raw sockets and metrics scrapes.

Fixtures live in tests/conftest.py; everything a test imports lives here, in one place, so no
folder keeps its own copy of a helper.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq
from prometheus_client.parser import text_string_to_metric_families
from zmq.utils.monitor import recv_monitor_message

READY = re.compile(r"serving .* at (tcp://\S+|ipc://\S+)")
WORKER_ENDPOINT = re.compile(r"remote workers may join at (tcp://[^\s;]+)")
METRICS_URL = re.compile(r"metrics for Prometheus at (http://\S+/metrics)")
REPLY_TIMEOUT_S = 10.0


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `predicate` until it returns something truthy, or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Direct child pids, read from /proc (no psutil needed)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(entry))
    return kids


def children_but_resource_tracker(pid: int) -> list[int]:
    """Child pids less multiprocessing's resource tracker, a helper process rather than a worker."""
    pids = []
    for child in children_of(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            pids.append(child)
    return pids


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, from /proc (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class ServerProcess:
    """A running `npyloader serve` subprocess and its log."""

    proc: subprocess.Popen
    log_path: Path
    endpoint: str = ""
    worker_endpoint: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        """Worker processes: children of serve other than multiprocessing's resource tracker."""
        return children_but_resource_tracker(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            every_child = children_of(self.proc.pid)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"server did not stop within {timeout}s of signal {sig}:\n{self.log()[-3000:]}")
            wait_for(lambda: not any(pid_alive(p) for p in every_child), 10, "worker processes to exit")
        return self.proc.returncode


@dataclass
class WorkerProcess:
    """A running `npyloader worker` and its log; `pids()` are its worker processes."""

    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> list[int]:
        return ServerProcess(self.proc, self.log_path).workers()


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loader_server.cli", *args]


def write_id_dataset(folder: Path, rows_per_file: list[int], features: int = 16, dtype: str = "float32") -> int:
    """Combined-layout files whose label column is the global sample id (so tests can count samples)
    and whose features are a deterministic function of it (so tests can check content)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, rows in enumerate(rows_per_file):
        ids = np.arange(start, start + rows)
        feats = (ids[:, None] * 1000 + np.arange(features)[None, :]) % 9973
        np.save(folder / f"part-{i:03d}.npy", np.column_stack([feats, ids]).astype(dtype))
        start += rows
    return start


# ---------------------------------------------------------------------------------------------
# Raw sockets and hostile payloads


class Detonator:
    """Unpickling this opens (creates) `path` for writing: proof that a payload reached pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb(marker: Path) -> np.ndarray:
    arr = np.empty(1, dtype=object)
    arr[0] = Detonator(str(marker))
    return arr


@contextmanager
def dealer(endpoint: str) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        yield sock
    finally:
        sock.close(0)


@contextmanager
def monitored_dealer(endpoint: str) -> Iterator[tuple[zmq.Socket, Callable[[], int]]]:
    """A DEALER connected to `endpoint`, and a function returning its next connection event. The
    monitor is attached before connecting, so the first CONNECTED event cannot be missed."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    monitor.setsockopt(zmq.LINGER, 0)

    def next_event() -> int:
        assert monitor.poll(int(REPLY_TIMEOUT_S * 1000)), "no connection event from zmq"
        return recv_monitor_message(monitor)["event"]

    try:
        sock.connect(endpoint)
        yield sock, next_event
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


# ---------------------------------------------------------------------------------------------
# Prometheus metrics


def metrics_url(log: str) -> str | None:
    found = METRICS_URL.search(log)
    return found.group(1) if found else None


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]
