"""`npyloader serve`: index the datasets, start the worker pool, run the broker until told to stop.

Everything a user can get wrong (files, augment specs, the endpoint) is checked here, before
any worker starts, and reported as one line naming the culprit. Shutdown is explicit and
bounded: workers are asked to stop, then terminated, then killed; sockets closed; shared
memory unlinked; the ipc folder removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from loader_client import endpoints, protocol
from loader_server.config import ConfigError, DatasetConfig, ServeConfig
from loader_server.data import manifest
from loader_server.data.augment import build_pipeline, sample_rng
from loader_server.data.index import DatasetIndex
from loader_server.data.index_cache import load_or_build
from loader_server.data.reader import SampleReader
from loader_server.data.sampler import Plan
from loader_server.metrics import SnapshotCollector, server_families, start_exporter
from loader_server.serve.broker import Broker, ServedDataset
from loader_server.serve.pool import LocalPool
from loader_server.shm import ipc_dir
from loader_server.shm.slots import SlotPool
from loader_server.signals import on_stop_signals
from loader_server.worker.loop import WorkerDataset, WorkerSpec

log = logging.getLogger("npyloader")

SLOTS_PER_WORKER = 4
CLOSE_LINGER_MS = 1000
PUBLISH_S = 0.5
MIN_SLOTS = 32


def output_arrays(index: DatasetIndex, cfg: DatasetConfig) -> list[protocol.ArraySpec]:
    """Shape and dtype of one served sample, found by running the augmentation on sample 0.

    Ops such as `crop` change the shape and value ops change the dtype, so the only honest
    answer is the pipeline's own output. This also surfaces a broken custom op at startup.
    """
    pipeline = build_pipeline(cfg.augment, spatial_targets=index.spec.spatial_targets)
    reader = SampleReader(index)
    try:
        x, y = reader.read(0)
        if len(pipeline):
            x, y = pipeline(x, y, sample_rng(cfg.seed, 0, 0))
    finally:
        reader.close()
    return [protocol.ArraySpec(name, np.asarray(v).dtype.newbyteorder("=").str, tuple(np.shape(v)))
            for name, v in (("x", x), ("y", y)) if v is not None]


def _slot_pool(name: str, nslots: int, batch_size: int, arrays: list[protocol.ArraySpec]) -> SlotPool:
    try:
        return SlotPool(nslots, batch_size, arrays, f"npyloader-{os.getpid()}-{name}")
    except ConfigError as e:
        raise ConfigError(f"dataset '{name}': {e}") from e


def _bind(sock: zmq.Socket, endpoint: str, option: str, encrypted: bool = False) -> str:
    ep = endpoints.parse(endpoint, option, bind=True)
    if ep.scheme == "tcp" and not ep.loopback and not encrypted:
        log.warning("%s %s accepts plain, unauthenticated tcp from other machines: anyone who can reach "
                    "it can read batches; use --curve-secret-key and --authorized-keys (npyloader keygen)",
                    option, endpoint)
    ep.prepare(sock)
    try:
        sock.bind(ep.for_zmq())
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            raise ConfigError(
                f"{option} {endpoint}: address already in use (another npyloader serve? "
                f"try `npyloader stats {endpoint}`); choose another port") from e
        raise ConfigError(f"{option} {endpoint}: cannot bind: {e}") from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Server:
    """A bound, running server; `serve()` below wraps it with signal handling for the CLI."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._ipc_dir = ipc_dir.make()
        self._ctx = zmq.Context()
        self._datasets: dict[str, ServedDataset] = {}
        self._pool: LocalPool | None = None
        self.broker: Broker | None = None
        self._auth = None
        self._csock = self._wsock = self._rsock = None
        self._exporter = None
        self._started = time.monotonic()
        try:
            self._setup()
        except BaseException:  # whatever stopped startup (Ctrl-C too), leave nothing behind; re-raised
            self.close()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        # Started before indexing, so that each worker's interpreter start and imports overlap
        # it; they get their specs (the indexes) once those exist.
        self._pool = LocalPool(None, cfg.workers)
        nslots = max(MIN_SLOTS, SLOTS_PER_WORKER * cfg.workers)
        indexes, specs, worker_datasets = {}, {}, {}
        for name, dcfg in cfg.datasets.items():
            indexing = time.monotonic()
            index = indexes[name] = load_or_build(dcfg, cfg.index_cache)
            index_s = time.monotonic() - indexing
            arrays = specs[name] = output_arrays(index, dcfg)
            plan = Plan(index.num_samples, dcfg.batch_size, dcfg.seed, dcfg.shuffle, dcfg.drop_remainder)
            if plan.num_batches == 0:
                raise ConfigError(f"dataset '{name}': {index.num_samples} samples make no full batch of "
                                  f"{dcfg.batch_size} with --drop-remainder; lower --batch-size")
            slots = _slot_pool(name, nslots, dcfg.batch_size, arrays) if cfg.workers else None
            self._datasets[name] = ServedDataset(name, index, plan, arrays, slots, index_s)
            worker_datasets[name] = WorkerDataset(index, plan, dcfg.augment, tuple(arrays),
                                                  slots.layout if slots else None, dcfg.on_bad_file == "skip")

        if cfg.curve is not None:
            self._auth = cfg.curve.start_authenticator(self._ctx)
        self._csock = self._socket(protocol.MAX_REQUEST_BYTES)
        self._csock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._csock.setsockopt(zmq.SNDHWM, 4 * protocol.MAX_CREDIT)
        self.endpoint = _bind(self._csock, cfg.bind, "--bind", cfg.curve is not None)

        largest_batch = max(sum(d.batch_size * spec.nbytes for spec in specs[n]) for n, d in cfg.datasets.items())
        # Local workers reach their own socket through a folder only this user can enter (no
        # CURVE needed there); remote workers get another, so none can pass for a local one.
        self._wsock = self._socket(largest_batch + protocol.MAX_REQUEST_BYTES, encrypted=False)
        worker_endpoint = _bind(self._wsock, f"ipc://{self._ipc_dir}/{ipc_dir.SOCKET_NAME}", "worker endpoint")
        self.worker_endpoint = setup = None
        if cfg.worker_bind:
            setup = manifest.describe(cfg.datasets, indexes, specs)
            self._rsock = self._socket(largest_batch + protocol.MAX_REQUEST_BYTES)
            self.worker_endpoint = _bind(self._rsock, cfg.worker_bind, "--worker-bind", cfg.curve is not None)
            log.info("remote workers may join at %s; data root %s (a worker keeping the data elsewhere "
                     "passes that folder as --data-root)", self.worker_endpoint, setup["root"])

        parent = os.getpid()
        self._pool.provide(lambda wid: WorkerSpec(wid, worker_endpoint, worker_datasets, parent, cfg.heartbeat_s))
        self.broker = Broker(self._datasets, self._csock, self._wsock, self._pool, setup, cfg.heartbeat_s,
                             cfg.client_timeout_s, self._rsock, cfg.task_timeout_s)
        self.broker.startup_s = time.monotonic() - self._started
        if cfg.metrics_port is not None:
            self.broker.publish_s = PUBLISH_S
            collector = SnapshotCollector(lambda: self.broker.published, server_families)
            self._exporter = start_exporter(cfg.metrics_port, cfg.metrics_host, collector, "server")

    def _socket(self, max_message: int, encrypted: bool = True) -> zmq.Socket:
        """A ROUTER with a bound on inbound messages, encrypted when CURVE is configured."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message)
        if encrypted and self.cfg.curve is not None:
            self.cfg.curve.apply(sock)
        return sock

    def ready_line(self) -> str:
        plans = [ds.plan for ds in self._datasets.values()]
        if len(plans) == 1:
            p = plans[0]
            return f"serving {p.num_samples} samples ({p.num_batches} batches of {p.batch_size}) at {self.endpoint}"
        total = sum(p.num_samples for p in plans)
        parts = ", ".join(f"{n}: {ds.plan.num_batches} batches of {ds.plan.batch_size}"
                          for n, ds in self._datasets.items())
        return f"serving {total} samples ({parts}) at {self.endpoint}"

    def run(self) -> None:
        self.broker.run(self._stop.is_set)
        self.broker.drain(self.cfg.drain_s, self._abort.is_set)

    def stop(self) -> None:
        """The first call stops taking work and drains; a second one cuts the drain short."""
        if self._stop.is_set():
            self._abort.set()
        self._stop.set()

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.shutdown()
            self._exporter.server_close()
        if self._pool is not None:
            # A server that failed before its broker existed has told no worker anything.
            self._pool.stop(told=self.broker.stop_workers() if self.broker is not None else set())
        if self._csock is not None:
            # Let ZeroMQ finish sending what the drain delivered, unless told to stop at once.
            self._csock.close(0 if self._abort.is_set() or not self.cfg.drain_s else CLOSE_LINGER_MS)
        for sock in (self._wsock, self._rsock):
            if sock is not None:
                sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        for ds in self._datasets.values():
            if ds.slots is not None:
                ds.slots.close()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def serve(cfg: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT or SIGTERM, then stop everything cleanly."""
    server = Server(cfg)
    with on_stop_signals(server.stop):
        try:
            line = server.ready_line()
            log.info(line)
            if on_ready:
                on_ready(line)
            server.run()
            log.info("stopping: %d batches served", server.broker.batches_sent)
        finally:
            server.close()
