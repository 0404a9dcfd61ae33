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


def rss_kb(pid: int) -> int:
    """Resident memory of a process now, from /proc (VmRSS), in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, in MB."""
    return rss_kb(pid) / 1024


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


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, read from /proc. A process started
    with `launch` leads a group of its own, which its children join and keep after it dies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def describe(pids: list[int]) -> str:
    """`pid: command line` of each pid, for a failure message."""
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "(gone)"
        lines.append(f"{pid}: {cmd.strip()[:200]}")
    return "; ".join(lines)


def launch(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` with its output in `log_path`, stdin from /dev/null (no terminal it could
    stop on or read), `env` added to the environment, and in a session and process group of
    its own (pgid == pid), so that `kill_group` reaches every process it starts, even after it
    died itself, and a Ctrl-C meant for pytest reaches only pytest, whose teardown stops it."""
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> list[int]:
    """End `proc` and everything left in its process group: SIGTERM to the group, up to `grace`
    seconds for all of it to go, then SIGKILL to whatever remains; `proc` is reaped. Returns the
    pids that needed SIGKILL. Never raises for processes that are already gone."""
    pgid = proc.pid

    def signal_group(sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def anything_left() -> bool:
        return proc.poll() is None or bool(group_members(pgid))

    stubborn: list[int] = []
    if anything_left():
        signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while anything_left() and time.monotonic() < deadline:
            time.sleep(0.02)
        if anything_left():
            stubborn = group_members(pgid)
            signal_group(signal.SIGKILL)
    proc.wait(10)
    return stubborn


def run_bounded(argv: list[str], timeout: float, grace: float = 10.0, **kw: object) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)` for commands that start servers of
    their own (bench, demo, soak, serve): the command runs in a process group of its own, and on
    timeout the whole group gets SIGTERM, then SIGKILL after `grace` seconds, so nothing it
    started outlives the test; then the test fails with the command's output so far.
    subprocess.run's own timeout kills only the direct child and would leave its servers running."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace)
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:  # a process outside the group still holds the pipes
            out, err = "", ""
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout}s; stopped it and its process "
                             f"group\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}") from None
    except BaseException:
        kill_group(proc, grace)
        raise
    # helpers such as a resource tracker follow the command out within moments; whatever is
    # left after `grace` is ended here, since the test started it
    deadline = time.monotonic() + grace
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_group(proc, grace)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclass
class ServerProcess:
    """A running `npyloader serve` (or `npyloader worker`) started with `launch`, and its log."""

    proc: subprocess.Popen
    log_path: Path
    endpoint: str = ""
    worker_endpoint: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        """Worker processes: children of serve other than multiprocessing's resource tracker."""
        return children_but_resource_tracker(self.proc.pid)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait for the ready line and read the endpoints from the log; fail with the log if the
        server exits first."""
        def ready() -> str | None:
            m = READY.search(self.log())
            if m is None and self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            return m.group(1) if m else None

        self.endpoint = wait_for(ready, timeout, "the server's ready line")
        found = WORKER_ENDPOINT.search(self.log())
        self.worker_endpoint = found.group(1) if found else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and wait for the process, then for every process of its group (workers,
        multiprocessing's resource tracker, which unlinks shared memory) to exit by itself. Also
        when the process had already exited: its workers may outlive it. Whatever is still there
        at a deadline is killed (the group, SIGTERM then SIGKILL) and the test fails naming it."""
        problems = []
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {self.proc.pid} did not stop within {timeout}s of signal {sig}:\n"
                                    f"{self.log()[-3000:]}")
            if not problems:
                try:
                    wait_for(lambda: not group_members(self.proc.pid), 10, "its other processes to exit")
                except AssertionError:
                    left = group_members(self.proc.pid)
                    problems.append(f"processes started by pid {self.proc.pid} outlived it by 10 s: {describe(left)}")
        finally:
            kill_group(self.proc)
        if problems:
            raise AssertionError("\n".join(problems))
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return ServerProcess(self.proc, self.log_path).stop(sig, timeout)


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loader_server.cli", *args]


def as_user_command(uid: int, *args: str) -> list[str]:
    """`npyloader ARGS` run as user and group `uid`, dropped inside the interpreter once the modules
    are imported: the interpreter may sit where that user cannot reach (a pyenv under /root, mode
    0700), so a `setpriv` prefix could not even start it. Needs root."""
    script = ("import os, sys\n"
              "from loader_server import cli\n"
              "import loader_server.serve.server, loader_server.data.index_cache\n"
              "uid = int(sys.argv[1])\n"
              "os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)\n"
              "sys.exit(cli.main(sys.argv[2:]))\n")
    return [sys.executable, "-c", script, str(uid), *args]


# A command prefix that starts the command with SIGINT and SIGTERM ignored, as a script's
# background job (`cmd &`) starts with SIGINT ignored: the dispositions survive the exec.
IGNORING_STOP_SIGNALS = ("sh", "-c", "trap '' INT TERM; exec \"$@\"", "sh")


def ignored_signals(pid: int) -> set[int]:
    """The signals process `pid` ignores, from /proc (SigIgn)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


# An augment op that stands for costly work: batches stay in progress long enough for a test to
# signal, kill or stop the worker building them (see the `augment_package` fixture).
PAUSE_OP = "import time\n\ndef pause(x, y, rng, seconds=0.05):\n    time.sleep(seconds)\n    return x, y\n"


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


def batch_ids(batch: tuple[np.ndarray, ...]) -> list[int]:
    """The sample ids a batch of an id dataset carries (its label column)."""
    return batch[1].astype(int).tolist()


def ids_of(batches: list[tuple[np.ndarray, ...]]) -> list[int]:
    """The sample ids of a list of batches, in order."""
    return np.concatenate([b[1] for b in batches]).astype(int).tolist()


def read_epoch(url: str, epoch: int = 0, timeout: float = 60, **kw: object) -> list[tuple[np.ndarray, ...]]:
    """One whole epoch through BatchStream, each array copied out of its message."""
    from loader_client import BatchStream

    with BatchStream(url, epoch=epoch, timeout=timeout, **kw) as stream:
        return [tuple(a.copy() for a in batch) for batch in stream]


def tasks_in_progress(endpoint: str) -> int:
    """Batches the server's workers are building now."""
    from loader_client import request_stats

    return sum(w["tasks"] for w in request_stats(endpoint)["workers"]["list"])


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


# Every URL tests fetch is on loopback: an http_proxy inherited from the shell must not apply.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10) -> tuple[str, bytes]:
    """(Content-Type, body) of a GET, straight to the host, never through a proxy."""
    with _DIRECT.open(url, timeout=timeout) as response:
        return response.headers["Content-Type"], response.read()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of one scrape."""
    content_type, body = http_get(url)
    assert content_type.startswith("text/plain")
    text = body.decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


# What TensorFlow prints on its own while it starts (on a machine without a GPU): none of it may
# appear in the demo's output (loader_server.tools.demo.quiet_tensorflow).
TF_STARTUP_NOISE = ("Could not find cuda drivers", "cuInit", "oneDNN custom operations", "absl::InitializeLog",
                    "cpu_feature_guard", "To enable the following instructions")
