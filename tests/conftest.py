"""Shared fixtures: real `npyloader serve` processes on loopback, and small real datasets.

Every server or worker a test starts runs in a process group of its own and is stopped by the
fixture, pass or fail; the fixture fails the test if any process of that group outlived it.
Waiting is always on a condition with a deadline, never a bare sleep. The helpers these
fixtures use, and that tests import, are in tests/helpers.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Keras picks its backend from the environment at import; the keras extra is TensorFlow and
# tests use tf.data, so a KERAS_BACKEND inherited from the shell must not change that.
os.environ["KERAS_BACKEND"] = "tensorflow"

from tests.helpers import (  # noqa: E402
    ServerProcess,
    WorkerProcess,
    launch,
    serve_command,
    wait_for,
    write_id_dataset,
)


def pytest_configure(config: pytest.Config) -> None:
    """Children inherit ignored and blocked signals across exec, whatever pytest inherited (a
    shell's background job ignores SIGINT; nohup, SIGHUP; some runners block or ignore SIGCHLD).
    A server or `stats --watch` started with SIGINT ignored would not stop on the SIGINT a test
    sends, and one with SIGCHLD ignored could not wait for its workers. So the signals tests
    rely on get their default disposition and are unblocked here, before any child starts."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                signal.SIGCHLD: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    for sig, handler in defaults.items():
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*defaults, signal.SIGALRM})


@pytest.fixture(autouse=True)
def private_index_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by tests cache indexes in a temporary folder, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def stop_all(processes: list[ServerProcess] | list[WorkerProcess]) -> None:
    """Stop every one of `processes`, even when stopping an earlier one fails; then fail naming
    each that did not stop cleanly."""
    errors = []
    for process in processes:
        try:
            process.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        raise AssertionError("\n".join(errors))


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `npyloader worker --connect ENDPOINT ARGS`; every one is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(endpoint: str, *args: str, processes: int = 1, env: dict | None = None,
              prefix: tuple[str, ...] = ()) -> WorkerProcess:
        """`env` adds to the environment; `prefix` wraps the command (e.g. a shell that ignores signals)."""
        log_path = tmp_path / f"worker-{len(started)}.log"
        proc = launch([*prefix, *serve_command("worker", "--connect", endpoint, "--processes", str(processes), *args)],
                      log_path, env)
        started.append(WorkerProcess(proc, log_path))
        return started[-1]

    yield start
    stop_all(started)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `npyloader serve ARGS --bind tcp://127.0.0.1:0 --workers N`; wait for its ready line
    and its worker processes. `workers=None` or `bind=None` leave that flag out, for a config
    file's [server] table to decide."""
    started: list[ServerProcess] = []

    def start(*args: str, workers: int | None = 2, bind: str | None = "tcp://127.0.0.1:0",
              ready_timeout: float = 90.0, expect_ready: bool = True, env: dict | None = None,
              prefix: tuple[str, ...] = ()) -> ServerProcess:
        """`env` adds to the environment; `prefix` wraps the command (e.g. unshare, setpriv)."""
        log_path = tmp_path / f"server-{len(started)}.log"
        argv = list(args)
        if "--bind" not in argv and bind is not None:
            argv += ["--bind", bind]
        if "--workers" not in argv and workers is not None:
            argv += ["--workers", str(workers)]
        server = ServerProcess(launch([*prefix, *serve_command("serve", *argv)], log_path, env), log_path)
        started.append(server)
        if not expect_ready:
            return server
        server.wait_ready(ready_timeout)
        if "--workers" in argv:
            expected = int(argv[argv.index("--workers") + 1])
            wait_for(lambda: len(server.workers()) >= expected, 30, "worker processes")
        return server

    yield start
    stop_all(started)


@pytest.fixture
def augment_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """`make(name, source)` writes package `name` with module `augs` holding `source` under
    tmp_path, puts it on the PYTHONPATH the servers started afterwards inherit, and returns
    "name.augs" for `--augment name.augs:op:k=v`."""
    def make(name: str, source: str) -> str:
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "augs.py").write_text(source)
        monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        return f"{name}.augs"

    return make


@pytest.fixture
def id_dataset(tmp_path: Path) -> tuple[Path, int]:
    """Five uneven files, 203 samples: batch 16 gives 13 batches with a partial last one."""
    folder = tmp_path / "ids"
    return folder, write_id_dataset(folder, [50, 37, 41, 60, 15])
