"""`npyloader serve` as a child of a program that trains through it (the demo, the examples).

Such a program owns its server: it starts it on a free loopback port, waits for the line saying
where it listens, and must stop it however the program ends (normal exit, an exception, Ctrl-C
while waiting for the server or while training), or the server and its workers would outlive it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("npyloader.local_server")

# The line `npyloader serve` logs once it accepts clients, with the endpoint they connect to.
READY = re.compile(r"serving .* at (tcp://\S+|ipc://\S+)")


@dataclass
class LocalServer:
    """A running `npyloader serve`: its process, the client endpoint it reported, its log file."""

    proc: subprocess.Popen
    url: str
    log_path: Path


def npyloader_command(*args: str) -> list[str]:
    """`npyloader ARGS` with this interpreter, so the server runs the same installation."""
    return [sys.executable, "-m", "loader_server.cli", *args]


@contextmanager
def running_server(serve_args: list[str], log_path: Path, ready_timeout: float = 120.0,
                   stop_timeout: float = 30.0) -> Iterator[LocalServer]:
    """Start `npyloader serve ARGS --bind tcp://127.0.0.1:0` with its output in `log_path`, yield
    it once ready, and stop it on the way out, whatever the way out is (see `stop_server`)."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(npyloader_command("serve", *serve_args, "--bind", "tcp://127.0.0.1:0"),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield LocalServer(proc, wait_for_line(proc, log_path, READY, ready_timeout, what="npyloader serve"), log_path)
    finally:
        stop_server(proc, stop_timeout)


def wait_for_line(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern, timeout: float = 180.0,
                  interval: float = 0.05, what: str = "npyloader") -> str:
    """The first group of `pattern` once it appears in `proc`'s log, polled with a deadline.
    RuntimeError with the log's end if the process exits first; TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(log_path.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(interval)
    raise TimeoutError(f"{what} did not log {pattern.pattern!r} within {timeout:g}s; see {log_path}")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, which lets the server finish the batches in progress and remove its workers,
    sockets and shared memory; SIGKILL only if it has not gone within `timeout`. Returns its exit
    status. A server that a terminal's Ctrl-C already reached takes this SIGTERM as its second
    signal and stops at once."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("npyloader serve (pid %d) did not stop within %gs of SIGTERM; killing it", proc.pid, timeout)
            proc.kill()
    return proc.wait()
