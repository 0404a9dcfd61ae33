"""The worker loop: read samples, augment them, assemble whole batches.

A worker is deliberately dumb: the broker says which batch of which epoch to build; the
worker never decides order. Each sample's randomness comes from
SeedSequence([seed, epoch, sample_id]), so which worker ran a batch never changes its bytes.

Two kinds run the same loop. A local worker (a child of `npyloader serve`) fills a slot of the
server's shared memory; a remote worker (`npyloader worker --connect`, on any host) returns
the arrays inline and the server forwards them. In both, the main thread owns the socket and
heartbeats while a compute thread builds batches, so a worker busy with a long batch is still
seen alive, and a stopped or vanished one is noticed by its silence.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from loader_client import protocol
from loader_server.data.augment import Pipeline, build_pipeline, sample_rng
from loader_server.data.index import DatasetError, DatasetIndex
from loader_server.data.reader import SampleReader
from loader_server.data.sampler import Plan
from loader_server.metrics import SharedCounters
from loader_server.shm.slots import SlotLayout, SlotReader

log = logging.getLogger(__name__)

TASKS_IN_FLIGHT = 2
TRACEBACK_FRAMES = 8
TRACEBACK_CHUNK = 2048


@dataclass(frozen=True)
class WorkerDataset:
    """Everything a worker needs to build batches of one dataset."""

    index: DatasetIndex
    plan: Plan
    augment: tuple[str, ...]
    specs: tuple[protocol.ArraySpec, ...]  # one sample of each array
    layout: SlotLayout | None = None
    skip_bad_files: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    """A local worker: its id, the server's ipc endpoint, and the datasets with their slots."""

    worker_id: int
    endpoint: str
    datasets: dict[str, WorkerDataset]
    parent_pid: int
    heartbeat_s: float = 1.0


class BatchBuilder:
    """Builds batch i of epoch e of one dataset: gather, augment, check, place."""

    def __init__(self, ds: WorkerDataset) -> None:
        self.ds = ds
        self.reader = SampleReader(ds.index)
        self.pipeline: Pipeline = build_pipeline(ds.augment, spatial_targets=ds.index.spec.spatial_targets)
        self._reported: set[str] = set()
        self.read_s = 0.0
        self.augment_s = 0.0

    def fill(self, epoch: int, samples: np.ndarray, outs: list[np.ndarray]) -> int:
        """Fill rows of `outs` with the batch's samples; returns how many rows were filled
        (fewer than the batch when --on-bad-file skip left out unreadable samples).
        `read_s` and `augment_s` say where this batch's time went, so a user who waits on data
        learns whether reading or augmentation is the cost."""
        self.read_s = self.augment_s = 0.0
        if not len(self.pipeline) and not self.ds.skip_bad_files:
            started = time.perf_counter()
            self.reader.read_batch_into(samples, outs)
            self.read_s = time.perf_counter() - started
            return len(samples)
        j = 0
        for sid in samples.tolist():
            try:
                self._fill_row(epoch, sid, outs, j)
            except DatasetError as e:
                if not self.ds.skip_bad_files:
                    raise
                self._report_skip(sid, e)
                continue
            except Exception as e:  # whatever failed (an augment op can raise anything), say which sample
                path, row = self.reader.locate(sid)
                raise RuntimeError(f"sample {sid} ({path} row {row}): {e}") from e
            j += 1
        return j

    def _fill_row(self, epoch: int, sid: int, outs: list[np.ndarray], j: int) -> None:
        started = time.perf_counter()
        if not len(self.pipeline):
            self.reader.read_into(sid, outs, j)
            self.read_s += time.perf_counter() - started
            return
        x, y = self.reader.read(sid)
        read = time.perf_counter()
        self.read_s += read - started
        x, y = self.pipeline(x, y, sample_rng(self.ds.plan.seed, epoch, sid))
        self.augment_s += time.perf_counter() - read
        for out, value, spec in zip(outs, (x,) if y is None else (x, y), self.ds.specs):
            _place(out, j, value, spec.name)

    def _report_skip(self, sid: int, error: DatasetError) -> None:
        path, _ = self.reader.locate(sid)
        if path not in self._reported:
            self._reported.add(path)
            log.warning("skipping unreadable samples of %s (--on-bad-file skip): %s", path, error)

    def samples(self, epoch: int, index: int, shard: list[int] | None) -> np.ndarray:
        return self.ds.plan.for_shard(shard).batch(epoch, index)

    def close(self) -> None:
        self.reader.close()


def short_traceback(exc: BaseException) -> str:
    """A failed batch's traceback as its client will see it: the last TRACEBACK_FRAMES frames of
    each exception in the chain (the op or read that raised, then each wrapper naming the
    sample), each frame or exception line cut to TRACEBACK_CHUNK bytes so that a huge message,
    repeated by every wrapper, cannot push the innermost frames out; the whole then cut from
    the front to fit a message field."""
    chunks = traceback.format_exception(exc, limit=-TRACEBACK_FRAMES)
    return protocol.clip("".join(_clip_chunk(c) for c in chunks), tail=True)


def _clip_chunk(chunk: str) -> str:
    short = protocol.clip(chunk, TRACEBACK_CHUNK)
    return short if short.endswith("\n") else short + "\n"


def _place(out: np.ndarray, row: int, value: np.ndarray, name: str) -> None:
    value = np.asarray(value)
    if value.shape != out.shape[1:] or value.dtype.newbyteorder("=") != out.dtype:
        raise ValueError(
            f"augmentation produced {name} of shape {value.shape} {value.dtype}, but this dataset's "
            f"batches hold {out.shape[1:]} {out.dtype}: every op must give the same shape and dtype for every sample"
        )
    out[row] = value


class TaskRunner:
    """Turns a task message into the reply frames; runs on the compute thread."""

    def __init__(self, datasets: dict[str, WorkerDataset], slots: SlotReader | None,
                 counters: SharedCounters | None = None) -> None:
        self.builders = {name: BatchBuilder(ds) for name, ds in datasets.items()}
        self._slots = slots
        self._counters = counters

    def __call__(self, msg: protocol.Message) -> list:
        started = time.perf_counter()
        try:
            builder = self.builders.get(msg["dataset"])
            if builder is None:
                raise RuntimeError(f"unknown dataset '{msg['dataset']}'")
            samples = builder.samples(msg["epoch"], msg["index"], msg.get("shard"))
            arrays = self._outputs(builder.ds, msg.get("slot"), len(samples))
            rows = builder.fill(msg["epoch"], samples, arrays)
        except Exception as e:  # anything a read or an augment op raises fails this batch only, not the worker
            log.exception("batch %d of epoch %d of '%s' failed: %s", msg["index"], msg["epoch"], msg["dataset"], e)
            if self._counters is not None:
                self._counters.add(failed=1)
            return protocol.encode("failed", {"task": msg["task"], "message": protocol.clip(str(e)),
                                              "traceback": short_traceback(e)})
        fields = {"task": msg["task"], "rows": rows, "busy_s": time.perf_counter() - started,
                  "read_s": builder.read_s, "augment_s": builder.augment_s}
        if self._counters is not None:
            self._counters.add(batches=1, busy_s=fields["busy_s"], read_s=builder.read_s, augment_s=builder.augment_s)
        if msg.get("slot") is not None:
            return protocol.encode("done", fields)
        return protocol.encode("done", fields, [(spec.name, a[:rows]) for spec, a in zip(builder.ds.specs, arrays)])

    def _outputs(self, ds: WorkerDataset, slot: int | None, rows: int) -> list[np.ndarray]:
        if slot is None:
            return [np.empty((rows, *spec.shape), dtype=spec.dtype) for spec in ds.specs]
        if ds.layout is None or self._slots is None or slot >= ds.layout.nslots:
            raise RuntimeError(f"slot {slot} was assigned, but this worker has no shared memory for it")
        return ds.layout.views(self._slots.buffer(ds.layout), slot, rows)

    def close(self) -> None:
        for b in self.builders.values():
            b.close()


class WorkerLoop:
    """The socket side of a worker: hands tasks to the compute thread, sends its replies back,
    and heartbeats. `hello` is what the worker sends to (re)join the server; `on_setup` is told
    of a `setup` the server sends again (a remote worker's rejoin), which local workers never get."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, runner: Callable[[protocol.Message], list] | None,
                 hello: list, heartbeat_s: float,
                 on_setup: Callable[[protocol.Message], None] | None = None,
                 side_beat: tuple[zmq.Socket, list] | None = None) -> None:
        self.ctx = ctx
        # a remote worker's heartbeat connection and what it sends there (see remote.py)
        self.side_beat = side_beat
        self.sock = sock
        self.runner = runner
        self.hello = hello
        self.heartbeat_s = heartbeat_s
        self.on_setup = on_setup
        self.last_heard = time.monotonic()
        # what the main thread does with each message from the broker; "stop" ends `run`
        self._handlers: dict[str, Callable[[protocol.Message], str | None]] = {
            "task": self._on_task, "stop": self._on_stop, "heartbeat": self._on_heartbeat,
            "rejoin": self._on_rejoin, "setup": self._on_setup,
        }
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_addr = f"inproc://npyloader-worker-{id(self)}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._thread = threading.Thread(target=self._compute, name="npyloader-compute", daemon=True)
        self._thread.start()

    def _compute(self) -> None:
        wake = self.ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        try:
            while (msg := self._tasks.get()) is not None:
                self._replies.put(self.runner(msg) if self.runner else [])
                wake.send(b"")
        finally:
            wake.close(0)

    def run(self, should_stop: Callable[[], bool], silence_s: float | None = None) -> str:
        """Serve until stopped. Returns "stop", or "silent" when the server went quiet for `silence_s`."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        next_beat = 0.0
        while not should_stop():
            events = dict(poller.poll(int(self.heartbeat_s * 250)))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
                while not self._replies.empty():
                    self.sock.send_multipart(self._replies.get(), copy=False)
            if self.sock in events:
                for _ in range(64):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if self._on_frames(frames) == "stop":
                        return "stop"
            now = time.monotonic()
            if now >= next_beat:
                self.sock.send_multipart(protocol.encode("heartbeat"))
                if self.side_beat is not None:
                    try:
                        self.side_beat[0].send_multipart(self.side_beat[1], flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # its short queue is full: the link is down, and a late beat says nothing
                next_beat = now + self.heartbeat_s
            if silence_s is not None and now - self.last_heard > silence_s:
                return "silent"
        return "stop"

    def _on_frames(self, frames: list) -> str | None:
        try:
            msg = protocol.decode(frames, allowed=protocol.BROKER_TO_WORKER, max_header_bytes=protocol.MAX_SETUP_BYTES)
        except Exception as e:  # one bad message must not stop the worker (a validator bug included)
            log.error("dropped a malformed message from the server: %s", e)
            return None
        self.last_heard = time.monotonic()
        return self._handlers[msg.type](msg)

    def _on_task(self, msg: protocol.Message) -> None:
        self._tasks.put(msg)

    def _on_stop(self, msg: protocol.Message) -> str:
        return "stop"

    def _on_heartbeat(self, msg: protocol.Message) -> None:
        """Nothing more to do: hearing from the server at all is what keeps it counted alive."""

    def _on_rejoin(self, msg: protocol.Message) -> None:
        log.info("the server does not know this worker (restarted?); joining again")
        self.sock.send_multipart(self.hello)

    def _on_setup(self, msg: protocol.Message) -> None:
        if self.on_setup is not None:
            self.on_setup(msg)

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join(30)
        self._wake_rx.close(0)


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a local worker process (started by the pool with the spawn method)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{spec.worker_id} %(levelname)s %(message)s")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"local-{spec.worker_id}".encode())
    sock.connect(spec.endpoint)
    slots = SlotReader()
    runner = TaskRunner(spec.datasets, slots)
    hello = protocol.encode("ready", {"worker": spec.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                                      "capacity": TASKS_IN_FLIGHT, "local": True})
    loop = WorkerLoop(ctx, sock, runner, hello, spec.heartbeat_s)
    sock.send_multipart(hello)
    try:
        loop.run(lambda: os.getppid() != spec.parent_pid)
    finally:
        loop.close()
        runner.close()
        slots.close()
        sock.close(0)
        ctx.term()
