"""The processes a soak runs: a server, a remote worker, clients; starting, restarting, watching.

Everything here is a real process started as a user would start it (`npyloader serve`,
`npyloader worker`, client programs), on fixed ports so that a server killed mid-epoch can come
back where its clients and workers expect it: all on loopback, or, where the lab allows it
(soak/network.py), the remote worker in a network namespace of its own, across a link that can
fail. The cluster knows which process plays which role, so memory is attributed to roles across
restarts, and it can say whether the whole system is healthy: every worker registered and every
client receiving batches again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loader_server.tools.local_server import READY
from loader_server.tools.netlab.hosts import NetnsError
from loader_server.tools.soak import data as soak_data
from loader_server.tools.soak import hang_op
from loader_server.tools.soak.clients import ClientLog, ClientSpec, ClientTally
from loader_server.tools.soak.network import SoakNetwork
from loader_server.tools.soak.procs import (
    MemoryTracker,
    ProcRef,
    boot_ticks_now,
    children,
    in_groups,
    shm_segments,
    spawn,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.1
READERS = {"A": ("train", "index"), "B": ("val", "shuffled")}


@dataclass(frozen=True)
class SoakConfig:
    """How long to soak and how the system under test is set up. The heartbeat is short so that
    stopped workers are noticed within seconds, and so is a hung op (`task_timeout_s`); clients
    wait long (`client_wait_s`) so that a fault the system recovers from never surfaces as a
    client error."""

    minutes: float = 10.0
    seed: int = 0
    workers: int = 2
    heartbeat_s: float = 0.5
    client_timeout_s: float = 5.0
    task_timeout_s: float = 5.0
    client_wait_s: float = 120.0
    client_step_s: float = 0.01
    prefetch: int = 8


@dataclass(frozen=True)
class ProgressMarks:
    """Batches served so far to each client session, by session id, and by which server: a
    restarted server numbers its sessions afresh (ZeroMQ's first routing ids are the same in
    every process), so the same id on a new server is a new session."""

    server_pid: int | None
    batches: dict[str, int]


class SoakError(RuntimeError):
    """The soak could not set up the system under test (a server that does not start)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One soak's processes. `on_tick` is called on every turn of every wait, so the soak keeps
    sampling memory and reporting progress while the cluster waits for something."""

    def __init__(self, root: Path, cfg: SoakConfig, on_tick: Callable[[], None] = lambda: None) -> None:
        self.root = root
        self.cfg = cfg
        self.on_tick = on_tick
        self.logs = root / "logs"
        self.results = root / "results"
        for folder in (self.logs, self.results, root / "tmp", root / "cache"):
            folder.mkdir(parents=True, exist_ok=True)
        self.stop_file = root / "stop-clients"
        self.hang_folder = root / "hang"
        self.hang_folder.mkdir(exist_ok=True)
        self.config_path = soak_data.write(root / "data", (hang_op.spec(self.hang_folder),))
        # Owned here and torn down last in close(): the namespaces (if any) the processes run in.
        self.net = SoakNetwork()
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.worker_port = free_port()
        self.worker_url = f"tcp://{self.net.worker_address}:{self.worker_port}"
        # Children keep their temporary files and index caches inside the soak's own folder.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(root / "tmp"),
                    "XDG_CACHE_HOME": str(root / "cache")}
        self.since = boot_ticks_now()
        self.started: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        self.server_log = self.logs / "server-1.log"
        self.remote: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.client_logs: dict[str, ClientLog] = {}
        self.vanishers: list[subprocess.Popen] = []
        self.memory = MemoryTracker()
        self.shm: set[str] = set()
        self._local_slots: list[int | None] = [None] * cfg.workers
        self._log_names: dict[str, int] = {}

    # -- starting ---------------------------------------------------------------------------

    def _spawn(self, role: str, args: list[str], remote: bool = False) -> tuple[subprocess.Popen, Path]:
        count = self._log_names[role] = self._log_names.get(role, 0) + 1
        log_path = self.logs / f"{role}-{count}.log"
        proc = spawn(args, log_path, self.env, self.net.prefix(remote))
        self.started.append(proc)
        return proc, log_path

    def start_server(self) -> float:
        """Start `npyloader serve` on the soak's ports; returns the seconds until it was ready."""
        c = self.cfg
        started = time.monotonic()
        proc, log_path = self._spawn("server", [
            "-m", "loader_server.cli", "serve", "--config", str(self.config_path), "--bind", self.url,
            "--worker-bind", self.worker_url, "--workers", str(c.workers), "--heartbeat", str(c.heartbeat_s),
            "--client-timeout", str(c.client_timeout_s), "--task-timeout", str(c.task_timeout_s),
            "--index-cache", str(self.root / "cache")])
        self.server, self.server_log = proc, log_path
        ready = self.wait_for(lambda: READY.search(log_path.read_text(errors="replace")) or proc.poll() is not None,
                              START_TIMEOUT_S)
        if proc.poll() is not None:
            raise SoakError(f"the server exited with status {proc.returncode} before it was ready: {tail(log_path)}")
        if not ready:
            raise SoakError(f"the server was not ready within {START_TIMEOUT_S:g}s: {tail(log_path)}")
        return time.monotonic() - started

    def start_remote(self) -> None:
        self.remote, _ = self._spawn("remote", [
            "-m", "loader_server.cli", "worker", "--connect", self.worker_url, "--processes", "1",
            "--heartbeat", str(self.cfg.heartbeat_s), "--task-timeout", str(self.cfg.task_timeout_s)],
            remote=True)

    def _client_spec(self, name: str, dataset: str, order: str, first_epoch: int = 0) -> ClientSpec:
        c = self.cfg
        return ClientSpec(name=name, url=self.url, dataset=dataset, order=order,
                          result=str(self.results / f"{name}.jsonl"), stop=str(self.stop_file),
                          parent_pid=os.getpid(), seed=c.seed, prefetch=c.prefetch, step_s=c.client_step_s,
                          timeout_s=c.client_wait_s, first_epoch=first_epoch)

    def start_readers(self) -> None:
        for name, (dataset, order) in READERS.items():
            spec = self._client_spec(name, dataset, order)
            self.clients[name], _ = self._spawn(f"client-{name}", ["-m", "loader_server.tools.soak.clients",
                                                                   json.dumps(asdict(spec))])
            self.client_logs[name] = ClientLog(Path(spec.result), ClientTally(name, dataset, order))

    def start_vanisher(self, first_epoch: int) -> tuple[subprocess.Popen, Path]:
        spec = self._client_spec(f"vanishing-{len(self.vanishers) + 1}", "train", "vanish", first_epoch)
        proc, _ = self._spawn("client-vanishing", ["-m", "loader_server.tools.soak.clients", json.dumps(asdict(spec))])
        self.vanishers.append(proc)
        return proc, Path(spec.result)

    # -- waiting and watching ---------------------------------------------------------------

    def wait_for(self, condition: Callable[[], Any], timeout: float) -> Any:
        """Poll `condition` until it is truthy (returned) or `timeout` passes (None)."""
        deadline = time.monotonic() + timeout
        while True:
            self.on_tick()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_S)

    def pause(self, seconds: float) -> None:
        """The soak's own pacing between faults; keeps ticking."""
        self.wait_for(lambda: False, seconds)

    def local_workers(self) -> list[ProcRef]:
        return children(self.server.pid) if self.server is not None and self.server.poll() is None else []

    def remote_workers(self) -> list[ProcRef]:
        return children(self.remote.pid) if self.remote is not None and self.remote.poll() is None else []

    def roles(self) -> dict[str, list[int]]:
        """Current pids of every role. Local workers keep their place (`local worker 2`) across
        restarts: a new process takes the place of one that is gone."""
        current = [p.pid for p in self.local_workers()]
        for i, pid in enumerate(self._local_slots):
            if pid not in current:
                self._local_slots[i] = None
        for pid in current:
            if pid not in self._local_slots and None in self._local_slots:
                self._local_slots[self._local_slots.index(None)] = pid
        roles = {"server": [self.server.pid] if self.server is not None else []}
        roles.update({f"local worker {i + 1}": [pid] if pid else [] for i, pid in enumerate(self._local_slots)})
        roles["remote `npyloader worker` (supervisor)"] = [self.remote.pid] if self.remote is not None else []
        roles["remote worker process"] = [p.pid for p in self.remote_workers()]
        for name, proc in self.clients.items():
            dataset, order = READERS[name]
            roles[f"client {name} ({dataset}, {order} order)"] = [proc.pid] if proc.poll() is None else []
        roles["vanishing clients"] = [p.pid for p in self.vanishers if p.poll() is None]
        return roles

    def sample(self) -> None:
        self.memory.sample(self.roles())
        if self.server is not None:
            self.shm |= shm_segments(self.server.pid)

    def tallies(self) -> dict[str, ClientTally]:
        return {name: cl.poll() for name, cl in self.client_logs.items()}

    def stats(self) -> dict | None:
        from loader_client.stream import ServerError, request_stats

        try:
            return request_stats(self.url, timeout=1.0)
        except (TimeoutError, ServerError, OSError):
            return None

    def progress_marks(self) -> ProgressMarks:
        stats = self.stats()
        return ProgressMarks(self.server.pid if self.server is not None else None,
                             {c["id"]: c["batches"] for c in stats["clients"]} if stats else {})

    def healthy(self, marks: ProgressMarks | None = None, gone_pid: int | None = None) -> bool:
        """Every worker registered (and `gone_pid` no longer among them), no vanished client
        still held, and each reading client served a batch since `marks` were taken."""
        stats = self.stats()
        if stats is None:
            return False
        same_server = marks is not None and self.server is not None and self.server.pid == marks.server_pid
        before = marks.batches if same_server else {}
        workers = stats["workers"]["list"]
        local = sum(w["local"] for w in workers)
        if local < self.cfg.workers or len(workers) - local < 1 or any(w["pid"] == gone_pid for w in workers):
            return False
        if len(stats["clients"]) > len(READERS):
            return False
        for dataset, _ in READERS.values():
            if not any(c["dataset"] == dataset and c["batches"] > before.get(c["id"], 0) for c in stats["clients"]):
                return False
        return True

    # -- stopping ---------------------------------------------------------------------------

    def stop_server(self, sig: int) -> tuple[int | None, float]:
        """Signal the server and wait for it: (exit status or None if it had to be killed, seconds)."""
        assert self.server is not None
        started = time.monotonic()
        self.server.send_signal(sig)
        if self.wait_for(lambda: self.server.poll() is not None, STOP_TIMEOUT_S) is None:
            self.server.kill()
            self.server.wait(10)
            return None, time.monotonic() - started
        return self.server.returncode, time.monotonic() - started

    def leftovers(self) -> list[ProcRef]:
        """Processes the soak started (or their descendants) still running."""
        return in_groups({p.pid for p in self.started}, self.since)

    def close(self) -> dict[str, Any]:
        """Stop everything still running: clients, worker, server by SIGTERM, then whatever
        remains by SIGKILL; report what had to be killed and what shared memory was left. The
        network namespaces go last, once nothing of the soak runs in them."""
        for proc in [*self.clients.values(), *self.vanishers, self.remote, self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.wait_for(lambda: all(p.poll() is not None for p in self.started), STOP_TIMEOUT_S)
        self.wait_for(lambda: not self.leftovers(), 10.0)
        left = [f"pid {ref.pid}: {cmdline(ref.pid)}" for ref in self.leftovers()]
        for ref in self.leftovers():
            log.error("process %d was still running after the soak stopped everything; killing it", ref.pid)
            ref.signal(signal.SIGKILL)
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        try:
            self.net.close()
        except NetnsError as e:
            log.error("tearing down the soak's network namespaces: %s", e)
            left.append(f"network namespaces: {e}")
        shm_left = sorted(name for name in self.shm if os.path.exists(f"/dev/shm/{name}"))
        for name in shm_left:
            log.error("shared memory /dev/shm/%s outlived its server; removing it", name)
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
        return {"leftover_processes": left, "shm_left": shm_left}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
