"""Shared fixtures: real `npyloader serve` processes on loopback, and small real datasets.

Every server a test starts is stopped by the fixture, pass or fail, and the fixture checks
that none of its worker processes outlived it. Waiting is always on a condition with a
deadline, never a bare sleep. The helpers these fixtures use, and that tests import, are in
tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    READY,
    WORKER_ENDPOINT,
    ServerProcess,
    WorkerProcess,
    serve_command,
    wait_for,
    write_id_dataset,
)


@pytest.fixture(autouse=True)
def private_index_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by tests cache indexes in a temporary folder, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


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


@pytest.fixture
def id_dataset(tmp_path: Path) -> tuple[Path, int]:
    """Five uneven files, 203 samples: batch 16 gives 13 batches with a partial last one."""
    folder = tmp_path / "ids"
    return folder, write_id_dataset(folder, [50, 37, 41, 60, 15])
