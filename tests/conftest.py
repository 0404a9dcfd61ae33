"""Shared fixtures: real `npyloader serve` processes on loopback, and small real datasets.

Every server a test starts is stopped by the fixture, pass or fail, and the fixture checks
that none of its worker processes outlived it. Waiting is always on a condition with a
deadline, never a bare sleep.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

READY = re.compile(r"serving .* at (tcp://\S+|ipc://\S+)")
WORKER_ENDPOINT = re.compile(r"remote workers may join at (tcp://[^\s;]+)")


@pytest.fixture(autouse=True)
def private_index_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by tests cache indexes in a temporary folder, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


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


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `npyloader worker --connect ENDPOINT ARGS`; every one is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(endpoint: str, *args: str, processes: int = 1, env: dict | None = None,
              popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        with open(log_path, "w") as log:
            proc = popen(serve_command("worker", "--connect", endpoint, "--processes", str(processes), *args),
                         stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        started.append(WorkerProcess(proc, log_path))
        return started[-1]

    yield start
    for worker in started:
        ServerProcess(worker.proc, worker.log_path).stop()


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loader_server.cli", *args]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `npyloader serve ARGS --bind tcp://127.0.0.1:0`; wait for its ready line."""
    started: list[ServerProcess] = []

    def start(*args: str, workers: int = 2, ready_timeout: float = 90.0, expect_ready: bool = True,
              env: dict | None = None, prefix: tuple[str, ...] = ()) -> ServerProcess:
        """`env` adds to the environment; `prefix` wraps the command (e.g. unshare, setpriv)."""
        log_path = tmp_path / f"server-{len(started)}.log"
        argv = list(args)
        if "--bind" not in argv:
            argv += ["--bind", "tcp://127.0.0.1:0"]
        if "--workers" not in argv:
            argv += ["--workers", str(workers)]
        with open(log_path, "w") as log:
            proc = subprocess.Popen([*prefix, *serve_command("serve", *argv)], stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        server = ServerProcess(proc, log_path)
        started.append(server)
        if not expect_ready:
            return server

        def ready() -> str | None:
            m = READY.search(server.log())
            if m is None and proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
            return m.group(1) if m else None

        server.endpoint = wait_for(ready, ready_timeout, "the server's ready line")
        found = WORKER_ENDPOINT.search(server.log())
        server.worker_endpoint = found.group(1) if found else ""
        wait_for(lambda: len(server.workers()) >= int(argv[argv.index("--workers") + 1]), 30, "worker processes")
        return server

    yield start
    errors = []
    for server in started:
        try:
            server.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        raise AssertionError("\n".join(errors))


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


@pytest.fixture
def id_dataset(tmp_path: Path) -> tuple[Path, int]:
    """Five uneven files, 203 samples: batch 16 gives 13 batches with a partial last one."""
    folder = tmp_path / "ids"
    return folder, write_id_dataset(folder, [50, 37, 41, 60, 15])
