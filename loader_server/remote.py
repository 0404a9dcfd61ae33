"""Joining a server from another machine: describe the datasets, remap paths, prove sameness.

A remote worker reads the files itself (a shared volume, NFS, or a copy per host), so only
batches cross the network. The server tells a joining worker how each dataset is configured;
the worker rewrites the server's data root to its own (`--data-root`), indexes the files, and
compares its fingerprint with the server's. A worker that sees different data would serve
different batches under the same (epoch, index), so it is refused, and both sides log the
first file that differs.
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
from dataclasses import asdict, dataclass, replace
from typing import Any

import zmq

from loader_client import protocol
from loader_client.security import ClientCurve
from loader_server.config import ConfigError, DatasetConfig
from loader_server.dataset import DatasetError, DatasetIndex
from loader_server.index_cache import default_dir, load_or_build
from loader_server.metrics import SharedCounters, SnapshotCollector, start_exporter, worker_families
from loader_server.pool import LocalPool
from loader_server.sampler import Plan
from loader_server.worker import TASKS_IN_FLIGHT, TaskRunner, WorkerDataset, WorkerLoop

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_PATH_KEYS = ("targets", "labels")


class DataMismatch(RuntimeError):
    """This worker's files differ from the server's; the message names the first difference."""


def _static_dir(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: every match lies below it."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=len(pattern))
    head = pattern[:cut]
    return head if cut == len(pattern) and os.path.isdir(head) else os.path.dirname(head)


def server_root(cfgs: dict[str, DatasetConfig], indexes: dict[str, DatasetIndex]) -> str:
    """The deepest folder holding every file and pattern of every dataset."""
    dirs = [os.path.dirname(os.path.abspath(p)) for ix in indexes.values() for p, _ in ix.file_sizes]
    for cfg in cfgs.values():
        patterns = [*cfg.data, *(getattr(cfg, k) for k in _PATH_KEYS if getattr(cfg, k))]
        dirs += [os.path.abspath(_static_dir(p)) or "/" for p in patterns]
    return os.path.commonpath(dirs)


def describe(cfgs: dict[str, DatasetConfig], indexes: dict[str, DatasetIndex],
             specs: dict[str, list[tuple[str, str, tuple[int, ...]]]]) -> dict[str, Any]:
    """The `setup` payload a joining worker needs: configs with absolute paths, fingerprints."""
    datasets = []
    for name, cfg in cfgs.items():
        config = asdict(cfg)
        config["data"] = [os.path.abspath(p) for p in cfg.data]
        for key in _PATH_KEYS:
            if config[key]:
                config[key] = os.path.abspath(config[key])
        datasets.append({
            "name": name, "config": config, "fingerprint": indexes[name].fingerprint(),
            "manifest": [list(row) for row in indexes[name].manifest()],
            "specs": [[n, d, list(s)] for n, d, s in specs[name]],
        })
    return {"root": server_root(cfgs, indexes), "datasets": datasets}


def local_config(entry: dict[str, Any], root: str, data_root: str | None) -> DatasetConfig:
    """The server's config of one dataset with its root rewritten to this host's `--data-root`."""
    def remap(path: str) -> str:
        if data_root is None or not (path == root or path.startswith(root.rstrip("/") + "/")):
            return path
        return os.path.join(data_root, os.path.relpath(path, root))

    config = dict(entry["config"])
    config["data"] = tuple(remap(p) for p in config["data"])
    for key in _PATH_KEYS:
        if config.get(key):
            config[key] = remap(config[key])
    config["augment"] = tuple(config.get("augment") or ())
    if config.get("x_shape") is not None:
        config["x_shape"] = tuple(config["x_shape"])
    return DatasetConfig(**config)


def check_same_data(index: DatasetIndex, entry: dict[str, Any]) -> None:
    """Raise DataMismatch naming the first differing file unless the fingerprints agree."""
    if index.fingerprint() == entry["fingerprint"]:
        return
    mine = index.manifest()
    theirs = [tuple(row) for row in entry["manifest"]]
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            raise DataMismatch(
                f"dataset '{index.name}': file #{i} differs: this worker has {a[0]} ({a[1]} bytes), "
                f"the server has {b[0]} ({b[1]} bytes)")
    if len(mine) != len(theirs):
        extra = mine[len(theirs)] if len(mine) > len(theirs) else theirs[len(mine)]
        side = "this worker" if len(mine) > len(theirs) else "the server"
        raise DataMismatch(f"dataset '{index.name}': only {side} has {extra[0]} "
                           f"({len(mine)} files here, {len(theirs)} on the server)")
    raise DataMismatch(f"dataset '{index.name}': the same files and sizes, but array headers or "
                       "layout options differ (dtype, shape or label column)")


@dataclass(frozen=True)
class RemoteWorkerSpec:
    """One remote worker process: where the server is and where this host keeps the data."""

    connect: str
    data_root: str | None
    heartbeat_s: float
    parent_pid: int
    curve: ClientCurve | None = None
    counters: SharedCounters | None = None


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


def _serve_one_session(ctx: zmq.Context, spec: RemoteWorkerSpec, orphaned: Callable[[], bool]) -> str:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if spec.curve is not None:
        spec.curve.apply(sock)
    sock.connect(spec.connect)
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
        loop = WorkerLoop(ctx, sock, runner, join, spec.heartbeat_s)
        restart = threading.Event()

        def on_message(msg: protocol.Message) -> bool:
            if msg.type == "setup":
                same = [d["fingerprint"] for d in msg["datasets"]] == [d["fingerprint"] for d in setup["datasets"]]
                if same:
                    sock.send_multipart(ready)
                else:
                    restart.set()
            return True

        sock.send_multipart(ready)
        log.info("serving %s for %s", ", ".join(datasets), spec.connect)
        try:
            why = loop.run(lambda: orphaned() or restart.is_set(), on_message, silence_s=SILENCE_BEATS * spec.heartbeat_s)
        finally:
            loop.close()
            runner.close()
        if why == "silent":
            log.warning("no word from %s for %.0fs; reconnecting", spec.connect, SILENCE_BEATS * spec.heartbeat_s)
        return why
    finally:
        sock.close(0)


SILENCE_BEATS = 3


def _await_setup(sock: zmq.Socket, join: list, spec: RemoteWorkerSpec,
                 orphaned: Callable[[], bool]) -> dict[str, Any] | None:
    """Ask to join until the server answers; log once while it is unreachable."""
    waited = False
    while not orphaned():
        sock.send_multipart(join)
        if sock.poll(int(spec.heartbeat_s * 2000)):
            try:
                msg = protocol.decode(sock.recv_multipart(), allowed=frozenset({"setup", "heartbeat", "rejoin"}),
                                      max_header_bytes=protocol.MAX_SETUP_BYTES)
            except protocol.ProtocolError as e:
                log.error("dropped a malformed message from %s: %s", spec.connect, e)
                continue
            if msg.type == "setup":
                return msg.fields
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
        specs = tuple((n, d, tuple(s)) for n, d, s in entry["specs"])
        datasets[cfg.name] = WorkerDataset(index, plan, cfg.augment, specs, skip_bad_files=cfg.on_bad_file == "skip")
    return datasets


def run_workers(spec: RemoteWorkerSpec, processes: int, metrics: tuple[str, int] | None = None) -> int:
    """`npyloader worker`: N processes joined to one server, each restarted if it dies, until
    SIGINT or SIGTERM. Exit status 2 when the server's data differs from this machine's.
    `metrics` (host, port) serves this host's counters to Prometheus."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    counters = SharedCounters(mp.get_context("spawn")) if metrics else None
    spec = replace(spec, counters=counters)
    pool = LocalPool(lambda _: spec, processes, target=run_remote_worker)
    log.info("%d worker process(es) joining %s", processes, spec.connect)
    latest: dict[str, Any] = {}
    exporter = None
    try:
        if counters is not None and metrics is not None:
            collector = SnapshotCollector(lambda: latest.get("now"), worker_families)
            exporter = start_exporter(metrics[1], metrics[0], collector, "worker")
        while not stop.wait(0.2):
            for _, code in pool.reap():
                if code == REFUSED_EXIT:
                    log.error("this machine's data differs from the server's (see above); stopping")
                    return 2
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
