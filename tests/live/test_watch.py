"""`npyloader stats --watch` against real servers: in a real pseudo-terminal, into a pipe, as
JSON Lines, and through a server that is not (yet) there. Each watch is stopped with SIGINT,
as Ctrl-C would, and must exit 0."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from loader_client import BatchStream, request_stats
from tests.helpers import free_port, kill_group, serve_command, wait_for

ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Watch:
    """A running `npyloader stats --watch` and everything it has written so far."""

    proc: subprocess.Popen
    fd: int
    output: str = ""
    _closed: bool = field(default=False, repr=False)

    def read_until(self, predicate: Callable[[str], object], timeout: float, what: str) -> object:
        """Read output until `predicate(output)` is truthy; fail naming `what` at the deadline."""
        deadline = time.monotonic() + timeout
        while not (found := predicate(self.output)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; output so far:\n{self.output[-3000:]}")
            self._read(min(0.2, max(0.0, deadline - time.monotonic())))
        return found

    def _read(self, wait: float) -> None:
        if self._closed or not select.select([self.fd], [], [], wait)[0]:
            return
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # a pty's master reads EIO once the child side has gone
            chunk = b""
        if not chunk:
            self._closed = True
        self.output += chunk.decode(errors="replace")

    def interrupt(self, timeout: float = 15.0) -> int:
        """SIGINT (Ctrl-C), draining output meanwhile so a full buffer cannot block the exit."""
        self.proc.send_signal(signal.SIGINT)
        wait_for(lambda: self._read(0.05) or self.proc.poll() is not None, timeout, "the watch to exit on SIGINT")
        return self.proc.returncode


@pytest.fixture
def start_watch() -> Iterator[Callable[..., Watch]]:
    """Start `npyloader stats ENDPOINT --watch ARGS` on a pty (`tty=True`) or a pipe, in a process
    group of its own; the group is stopped at teardown, pass or fail."""
    started: list[tuple[Watch, list[int]]] = []
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def start(endpoint: str, *args: str, tty: bool, size: tuple[int, int] = (50, 160)) -> Watch:
        argv = serve_command("stats", endpoint, "--watch", *args)
        if tty:
            master, slave = pty.openpty()
            resize(slave, *size)
            proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
            os.close(slave)
            watch = Watch(proc, master)
            started.append((watch, [master]))
        else:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            watch = Watch(proc, proc.stdout.fileno())
            started.append((watch, []))
        return watch

    yield start
    for watch, fds in started:
        kill_group(watch.proc)
        if watch.proc.stdout is not None:
            watch.proc.stdout.close()
        for fd in fds:
            os.close(fd)


def resize(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


@pytest.fixture
def streaming(start_server, id_dataset) -> Iterator[tuple[str, str]]:
    """A server (2 workers) and one client reading its epochs over and over, paced like a
    training step, until the test ends. Yields (endpoint, the client's id as stats show it)."""
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16")
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            with BatchStream(server.endpoint, timeout=30) as stream:
                while not stop.is_set():
                    for _ in stream:
                        if stop.wait(0.01):  # a training step's worth of time between batches
                            return
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 30, "both workers ready")
    client = threading.Thread(target=read, daemon=True)
    client.start()
    try:
        clients = wait_for(lambda: request_stats(server.endpoint)["clients"], 30, "the client to say hello")
        yield server.endpoint, clients[0]["id"]
    finally:
        stop.set()
        client.join(30)
    assert not errors, errors


def frames(output: str) -> list[str]:
    """Complete redraws: the text between consecutive cursor-home codes, escape codes removed."""
    return [ESCAPE.sub("", part).replace("\r", "") for part in output.split("\x1b[H")[1:-1]]


def test_tty_view_redraws_in_place_with_datasets_clients_and_workers_and_fits_the_terminal(streaming, start_watch):
    endpoint, client_id = streaming
    workers = request_stats(endpoint)["workers"]["list"]
    watch = start_watch(endpoint, "--interval", "0.2", tty=True)

    def full_view(output: str) -> str | None:
        for frame in reversed(frames(output)):
            if client_id[:8] in frame and "last 0." in frame and all(str(w["pid"]) in frame for w in workers):
                return frame
        return None

    frame = watch.read_until(full_view, 30, "a redraw showing the client and every worker")
    assert "\x1b[?25l" in watch.output, "the cursor is hidden while redrawing"
    assert len(frames(watch.output)) >= 2, "the view is redrawn, not printed once"
    lines = frame.splitlines()
    assert re.search(r"^train\s+203\s+13\s+16\s+1\s+\d+$", frame, re.M), f"the dataset row:\n{frame}"
    client_row = next(line for line in lines if line.startswith(client_id[:8]))
    assert re.search(r"\btrain\b.*\s\d+%\s+\d+%$", client_row), f"the client's wait fractions: {client_row!r}"
    for w in workers:
        row = next(line for line in lines if line.startswith(w["id"] + " "))
        assert "local" in row and w["host"] in row and str(w["pid"]) in row and re.search(r"\d+%", row), row

    resize(watch.fd, 12, 40)

    def cut_to_size(output: str) -> bool:
        last = frames(output)[-1:] or [""]
        lines = last[0].splitlines()
        return bool(lines) and lines[-1].startswith("...") and len(lines) <= 11 and all(len(x) <= 39 for x in lines)

    watch.read_until(cut_to_size, 30, "a redraw cut to a 40x12 terminal")
    assert watch.interrupt() == 0
    assert watch.output.endswith("\x1b[?25h\r\n"), "the cursor is shown again on exit"


def test_pipe_gets_timestamped_plain_blocks_without_escape_codes(streaming, start_watch):
    endpoint, client_id = streaming
    watch = start_watch(endpoint, "--interval", "0.2", tty=False)
    blocks = r"--- \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n"
    watch.read_until(lambda out: len(re.findall(blocks, out)) >= 3 and client_id[:8] in out, 30,
                     "three timestamped blocks showing the client")
    assert watch.interrupt() == 0
    assert "\x1b" not in watch.output
    block = re.split(blocks, watch.output)[2]
    assert re.search(r"^npyloader tcp://127\.0\.0\.1:\d+  up \d+s, \d+ batches, [\d.]+ MB served; last 0\.\d+s:", block, re.M)
    assert re.search(r"^DATASET\s+SAMPLES", block, re.M) and re.search(r"^WORKER\s+WHERE\s+HOST\s+PID", block, re.M)


def test_json_watch_writes_one_parseable_object_per_refresh_with_rates(streaming, start_watch):
    endpoint, client_id = streaming
    watch = start_watch(endpoint, "--interval", "0.2", "--json", tty=False)
    watch.read_until(lambda out: out.count("\n") >= 3, 30, "three JSON lines")
    assert watch.interrupt() == 0
    objects = [json.loads(line) for line in watch.output.splitlines()]
    assert len(objects) >= 3 and objects[0]["interval_s"] is None
    # the latest object with rates, and the reply before it, which they must be measured against
    at = max(i for i, o in enumerate(objects) if o.get("interval_s") is not None)
    previous, latest = objects[at - 1], objects[at]
    assert latest["endpoint"] == endpoint and 0 < latest["interval_s"] < 5
    assert latest["interval_s"] == pytest.approx(latest["uptime_s"] - previous["uptime_s"])
    assert latest["datasets"]["train"]["samples"] == 203
    # The fractions are clamped to 0..1, so a range check could not fail; recompute them from
    # the raw totals of the two lines instead. The client cannot have waited longer than it has
    # been connected (its waits come after its hello); the recent figures cover the last
    # interval, not the time since the server started.
    client, old = (next(c for c in o["clients"] if c["id"] == client_id) for o in (latest, previous))
    assert 0 <= client["wait_s"] <= client["connected_s"] + 0.002, client
    assert client["wait_fraction"] == pytest.approx(client["wait_s"] / client["connected_s"], abs=1e-9)
    span = client["connected_s"] - old["connected_s"]
    waited = min(1.0, max(0.0, (client["wait_s"] - old["wait_s"]) / span))
    assert client["recent_wait_fraction"] == pytest.approx(waited, abs=1e-9), (client, old)
    assert client["recent_bytes_per_s"] == pytest.approx((client["bytes"] - old["bytes"]) / span)
    old_workers = {w["id"]: w for w in previous["workers"]["list"]}
    for w in latest["workers"]["list"]:
        busy = 100 * (w["busy_s"] - old_workers[w["id"]]["busy_s"]) / latest["interval_s"]
        assert w["recent_busy_pct"] == pytest.approx(min(100.0, busy), abs=1e-9), (w, old_workers[w["id"]])


def test_watch_reports_a_silent_endpoint_keeps_retrying_and_shows_the_server_once_it_is_up(
        start_server, start_watch, id_dataset):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    watch = start_watch(endpoint, "--interval", "0.2", "--timeout", "0.3", tty=False)
    no_answer = f"no answer from {endpoint} (retrying)"
    watch.read_until(lambda out: out.count(no_answer) >= 2, 30, "two no-answer lines")
    assert watch.proc.poll() is None, "the watch keeps going"
    folder, _ = id_dataset
    start_server("--data", str(folder), "--label-column", "-1", "--bind", endpoint, workers=1)
    watch.read_until(lambda out: re.search(r"^train\s+203\s", out.rsplit(no_answer, 1)[1], re.M), 30,
                     "the dataset once the server is up")
    assert watch.interrupt() == 0
