"""`npyloader worker`: worker processes on another machine that join a server over the network.

A remote worker joins, receives the datasets' description (`data/manifest.py`), indexes its
own copy of the files, proves it sees the same data, then builds batches as a local worker
does and sends them inline; whenever the server goes quiet or restarts, it joins again. The
`npyloader worker` command supervises them: it restarts one that dies, and kills one still
building a batch past --task-timeout (`watchdog.py`), which the server cannot do from afar.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import zmq

from loader_client import endpoints, protocol
from loader_client.security import ClientCurve
from loader_client.stream import new_routing_id
from loader_server.config import DEFAULT_TASK_TIMEOUT_S, ConfigError
from loader_server.data.index import DatasetError
from loader_server.data.index_cache import default_dir, load_or_build
from loader_server.data.manifest import DataMismatch, check_same_data, local_config
from loader_server.data.sampler import Plan
from loader_server.metrics import (
    SharedCounters,
    SnapshotCollector,
    start_exporter,
    worker_families,
)
from loader_server.serve.pool import LocalPool
from loader_server.worker.loop import (
    TASKS_IN_FLIGHT,
    TaskRunner,
    WorkerDataset,
    WorkerLoop,
)
from loader_server.worker.watchdog import TaskClock, Watchdog, timed

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RemoteWorkerSpec:
    """One remote worker process: where the server is and where this host keeps the data."""

    connect: str
    data_root: str | None
    heartbeat_s: float
    parent_pid: int
    curve: ClientCurve | None = None
    counters: SharedCounters | None = None
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S
    clock: TaskClock | None = None  # this process's, read by the supervisor's watchdog

    def __post_init__(self) -> None:
        endpoints.parse(self.connect, "--connect", bind=False)


REFUSED_EXIT = 3


def run_remote_worker(spec: RemoteWorkerSpec) -> None:
    """Entry point of a `npyloader worker` process: join, serve, and rejoin whenever the
    server goes quiet or restarts. Exits with REFUSED_EXIT when its data differs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker pid {os.getpid()} %(levelname)s %(message)s")
    ctx = zmq.Context()
    orphaned = lambda: os.getppid() != spec.parent_pid  # noqa: E731
    try:
        while not orphaned():
            if _serve_one_session(ctx, spec, orphaned) == "refused":
                sys.exit(REFUSED_EXIT)
    finally:
        ctx.term()


HEARTBEAT_QUEUE = 4  # heartbeats held while the link is cut; past that, new ones are dropped


def _connect(ctx: zmq.Context, spec: RemoteWorkerSpec, routing_id: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if spec.curve is not None:
        spec.curve.apply(sock)
    endpoints.parse(spec.connect, "--connect", bind=False).prepare(sock)
    sock.connect(spec.connect)
    return sock


def _heartbeat_connection(ctx: zmq.Context, spec: RemoteWorkerSpec, of: bytes) -> tuple[zmq.Socket, list]:
    """A second connection that carries only heartbeats naming the batch connection `of`. On a
    thin link a batch of a few MB takes seconds to send, and a heartbeat sent on the same
    connection waits behind it: the server would take a busy worker for a silent one. Its queue
    is short, so heartbeats not sent during a partition are dropped rather than piled up."""
    beat = _connect(ctx, spec, new_routing_id())
    beat.setsockopt(zmq.SNDHWM, HEARTBEAT_QUEUE)
    return beat, protocol.encode("heartbeat", {"of": of})


def _serve_one_session(ctx: zmq.Context, spec: RemoteWorkerSpec, orphaned: Callable[[], bool]) -> str:
    routing_id = new_routing_id()
    sock = _connect(ctx, spec, routing_id)
    beat: zmq.Socket | None = None
    join = protocol.encode("join", {"pid": os.getpid(), "host": socket.gethostname()})
    try:
        setup = _await_setup(sock, join, spec, orphaned)
        if setup is None:
            return "stop"
        try:
            datasets = _prepare(setup, spec.data_root)
        except DataMismatch as e:
            log.error("refused by %s: %s", spec.connect, e)
            sock.send_multipart(protocol.encode("refused", {"message": str(e)}))
            sock.poll(1000, zmq.POLLOUT)
            return "refused"
        runner = TaskRunner(datasets, None, spec.counters)
        if spec.counters is not None:
            spec.counters.add(sessions=1)
        ready = protocol.encode("ready", {"pid": os.getpid(), "host": socket.gethostname(),
                                          "capacity": TASKS_IN_FLIGHT, "local": False})
        restart = threading.Event()

        def on_setup(msg: protocol.Message) -> None:
            """A setup answering a rejoin: the same data, or start over with the new one."""
            same = [d["fingerprint"] for d in msg["datasets"]] == [d["fingerprint"] for d in setup["datasets"]]
            if same:
                sock.send_multipart(ready)
            else:
                restart.set()

        build = runner if spec.clock is None else timed(runner, spec.clock)
        beat, side_heartbeat = _heartbeat_connection(ctx, spec, routing_id)
        loop = WorkerLoop(ctx, sock, build, join, spec.heartbeat_s, on_setup, side_beat=(beat, side_heartbeat))

        sock.send_multipart(ready)
        log.info("serving %s for %s", ", ".join(datasets), spec.connect)
        try:
            why = loop.run(lambda: orphaned() or restart.is_set(), silence_s=SILENCE_BEATS * spec.heartbeat_s)
        finally:
            loop.close()
            runner.close()
        if why == "silent":
            log.warning("no word from %s for %.0fs; reconnecting", spec.connect, SILENCE_BEATS * spec.heartbeat_s)
        return why
    finally:
        sock.close(0)
        if beat is not None:
            beat.close(0)


SILENCE_BEATS = 3


def _await_setup(sock: zmq.Socket, join: list, spec: RemoteWorkerSpec,
                 orphaned: Callable[[], bool]) -> dict[str, Any] | None:
    """Ask to join until the server answers; log once while it is unreachable."""
    waited = False
    while not orphaned():
        sock.send_multipart(join)
        if sock.poll(int(spec.heartbeat_s * 2000)):
            try:
                msg = protocol.decode(sock.recv_multipart(), allowed=protocol.BROKER_TO_WORKER,
                                      max_header_bytes=protocol.MAX_SETUP_BYTES)
            except protocol.ProtocolError as e:
                log.error("dropped a malformed message from %s: %s", spec.connect, e)
                continue
            if msg.type == "setup":
                return msg.fields
            # anything else (a heartbeat, a rejoin) is answered by the next join anyway
        elif not waited:
            log.info("waiting for the server at %s", spec.connect)
            waited = True
    return None


def _prepare(setup: dict[str, Any], data_root: str | None) -> dict[str, WorkerDataset]:
    datasets = {}
    for entry in setup["datasets"]:
        cfg = local_config(entry, setup["root"], data_root)
        try:
            index = load_or_build(cfg, default_dir())
        except (DatasetError, ConfigError) as e:
            where = (f"the server's data root {setup['root']} is {data_root} here (--data-root)" if data_root
                     else f"this machine has no data at the server's data root {setup['root']}; pass --data-root")
            raise DataMismatch(f"dataset '{cfg.name}': {e} ({where})") from e
        check_same_data(index, entry)
        plan = Plan(index.num_samples, cfg.batch_size, cfg.seed, cfg.shuffle, cfg.drop_remainder)
        specs = tuple(protocol.ArraySpec.from_wire(s) for s in entry["specs"])
        datasets[cfg.name] = WorkerDataset(index, plan, cfg.augment, specs, skip_bad_files=cfg.on_bad_file == "skip")
    return datasets


def run_workers(spec: RemoteWorkerSpec, processes: int, metrics: tuple[str, int] | None = None) -> int:
    """`npyloader worker`: N processes joined to one server, each restarted if it dies, until
    SIGINT or SIGTERM. Exit status 2 when the server's data differs from this machine's.
    `metrics` (host, port) serves this host's counters to Prometheus."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    ctx = mp.get_context("spawn")
    counters = SharedCounters(ctx) if metrics else None
    watchdog = Watchdog(ctx, spec.task_timeout_s, counters)
    spec = replace(spec, counters=counters)
    pool = LocalPool(lambda wid: replace(spec, clock=watchdog.clock_for(wid)), processes, target=run_remote_worker)
    log.info("%d worker process(es) joining %s", processes, spec.connect)
    latest: dict[str, Any] = {}
    exporter = None
    try:
        if counters is not None and metrics is not None:
            collector = SnapshotCollector(lambda: latest.get("now"), worker_families)
            exporter = start_exporter(metrics[1], metrics[0], collector, "worker")
        while not stop.wait(0.2):
            for wid, code in pool.reap():
                watchdog.forget(wid)
                if code == REFUSED_EXIT:
                    log.error("this machine's data differs from the server's (see above); stopping")
                    return 2
            watchdog.check(pool.kill)
            if counters is not None:
                latest["now"] = {**counters.snapshot(), "alive": pool.alive(), "respawns": pool.respawns,
                                 "server": spec.connect, "host": socket.gethostname()}
        return 0
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
        pool.stop(deadline_s=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
