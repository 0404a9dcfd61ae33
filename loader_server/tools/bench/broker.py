"""How many batches per second one server routes, and the server's own CPU per batch.

The broker is one Python thread in the server process, so its CPU per batch decides how many
trainers and worker hosts one server can feed. Measured with batches small enough (one 32-byte
sample) that the workers' and clients' work is negligible and routing is all there is: local
workers filling slots and remote workers relaying frames, clients reading over the socket and
over shared memory. The server process's CPU seconds (from /proc) divided by the batches it
routed is its cost per batch; one core's worth of that is the ceiling of one server.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loader_server.tools.bench.procs import (
    JOIN,
    cpu_seconds,
    npyloader_process,
    stop,
)
from loader_server.tools.local_server import READY, wait_for_line

log = logging.getLogger(__name__)

SAMPLES = 4096
FEATURES = 8


@dataclass
class RoutingResult:
    case: str
    batches_per_s: float
    server_cpu_us_per_batch: float
    server_cpu_share: float


def _reader(url: str, transport: str, epochs: int, done: Any) -> None:
    from loader_client import BatchStream

    with BatchStream(url, transport=transport, prefetch=64, timeout=120) as stream:
        for _ in stream:  # warm-up epoch
            pass
        done.put("ready")
        count = 0
        for _ in range(epochs):
            count += sum(1 for _ in stream)
        done.put(count)


def measure_routing(local: int, remote: int, clients: list[str], seconds: float, tmp: Path) -> RoutingResult:
    """Route tiny batches for about `seconds` with `local` + `remote` workers and one reader
    process per entry of `clients` ("shm" or "socket")."""
    data = tmp / "tiny"
    data.mkdir(exist_ok=True)
    rows = np.zeros((SAMPLES, FEATURES + 1), np.float32)
    rows[:, -1] = np.arange(SAMPLES)
    np.save(data / "tiny.npy", rows)
    args = ["serve", "--data", str(data), "--label-column", "-1", "--batch-size", "1", "--workers", str(local),
            "--bind", "tcp://127.0.0.1:0", "--index-cache", str(tmp / "cache")]
    if remote:
        args += ["--worker-bind", "tcp://127.0.0.1:0"]
    server = npyloader_process(*args, log_path=tmp / "server.log")
    worker = None
    procs: list[mp.Process] = []
    try:
        url = wait_for_line(server, tmp / "server.log", READY)
        if remote:
            joined = JOIN.search((tmp / "server.log").read_text()).group(1)
            worker = npyloader_process("worker", "--connect", joined, "--processes", str(remote), log_path=tmp / "worker.log")
        epochs = max(1, int(seconds * 4000 / SAMPLES))
        ctx = mp.get_context("spawn")
        done = ctx.Queue()
        procs = [ctx.Process(target=_reader, args=(url, t, epochs, done), daemon=True) for t in clients]
        for p in procs:
            p.start()
        for _ in procs:
            assert done.get(timeout=180) == "ready"
        cpu, wall = cpu_seconds(server.pid), time.perf_counter()
        batches = sum(done.get(timeout=600) for _ in procs)
        wall, cpu = time.perf_counter() - wall, cpu_seconds(server.pid) - cpu
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        stop(worker, server)
    case = f"{local} local + {remote} remote workers, clients: {', '.join(clients)}"
    return RoutingResult(case, batches / wall, cpu / batches * 1e6, cpu / wall)


CASES = [
    (2, 0, ["socket"]),
    (2, 0, ["shm"]),
    (2, 0, ["shm", "shm", "socket", "socket"]),
    (0, 2, ["socket"]),
    (2, 4, ["shm", "socket"]),
]


def run(seconds: float) -> list[RoutingResult]:
    out = []
    with tempfile.TemporaryDirectory(prefix="npyloader-bench-broker-") as tmp:
        for n, (local, remote, clients) in enumerate(CASES):
            log.info("bench broker: %d local + %d remote workers, %d client(s)", local, remote, len(clients))
            case_dir = Path(tmp) / f"case-{n}"
            case_dir.mkdir()
            out.append(measure_routing(local, remote, clients, seconds, case_dir))
    return out
