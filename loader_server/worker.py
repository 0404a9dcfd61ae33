"""The worker loop: read samples, augment them, assemble whole batches into shared memory.

A worker is deliberately dumb: the broker says which samples make batch i of epoch e and
which slot to fill; the worker never decides order. Each sample's randomness comes from
SeedSequence([seed, epoch, sample_id]), so which worker ran a batch never changes its bytes.
Any failure is reported back with the sample, file, row and op that failed, and the worker
keeps serving; a worker whose server disappears exits instead of lingering as an orphan.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

import numpy as np
import zmq

from loader_client import protocol
from loader_server.augment import Pipeline, build_pipeline, sample_rng
from loader_server.dataset import DatasetError, DatasetIndex, SampleReader
from loader_server.sampler import Plan
from loader_server.slots import SlotLayout, SlotReader

log = logging.getLogger(__name__)

POLL_MS = 500


@dataclass(frozen=True)
class WorkerDataset:
    """Everything a worker needs to build batches of one dataset."""

    index: DatasetIndex
    plan: Plan
    augment: tuple[str, ...]
    layout: SlotLayout


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: int
    endpoint: str
    datasets: dict[str, WorkerDataset]
    parent_pid: int


class BatchBuilder:
    """Fills one slot with batch i of epoch e of one dataset: gather, augment, check, place."""

    def __init__(self, ds: WorkerDataset, slots: SlotReader) -> None:
        self.ds = ds
        self.reader = SampleReader(ds.index)
        self.pipeline: Pipeline = build_pipeline(ds.augment, spatial_targets=ds.index.spec.spatial_targets)
        self._slots = slots

    def build(self, epoch: int, index: int, slot: int, shard: list[int] | None = None) -> int:
        samples = self.ds.plan.for_shard(shard).batch(epoch, index)
        rows = len(samples)
        outs = self.ds.layout.views(self._slots.buffer(self.ds.layout), slot, rows)
        for j, sid in enumerate(samples.tolist()):
            try:
                if not len(self.pipeline):
                    self.reader.read_into(sid, outs, j)
                    continue
                values = self._augmented(epoch, sid)
                for out, value, layout in zip(outs, values, self.ds.layout.arrays):
                    _place(out, j, value, layout.name)
            except DatasetError:
                raise
            except Exception as e:
                path, row = self.reader.locate(sid)
                raise RuntimeError(f"sample {sid} ({path} row {row}): {e}") from e
        return rows

    def _augmented(self, epoch: int, sid: int) -> tuple[np.ndarray, ...]:
        x, y = self.reader.read(sid)
        x, y = self.pipeline(x, y, sample_rng(self.ds.plan.seed, epoch, sid))
        return (x,) if y is None else (x, y)

    def close(self) -> None:
        self.reader.close()


def _place(out: np.ndarray, row: int, value: np.ndarray, name: str) -> None:
    value = np.asarray(value)
    if value.shape != out.shape[1:] or value.dtype.newbyteorder("=") != out.dtype:
        raise ValueError(
            f"augmentation produced {name} of shape {value.shape} {value.dtype}, but this dataset's "
            f"batches hold {out.shape[1:]} {out.dtype}: every op must give the same shape and dtype for every sample"
        )
    out[row] = value


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a local worker process (started by the pool with the spawn method)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{spec.worker_id} %(levelname)s %(message)s")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.endpoint)
    slots = SlotReader()
    builders = {name: BatchBuilder(ds, slots) for name, ds in spec.datasets.items()}
    try:
        _serve(sock, spec, builders)
    finally:
        for b in builders.values():
            b.close()
        slots.close()
        sock.close(0)
        ctx.term()


def _serve(sock: zmq.Socket, spec: WorkerSpec, builders: dict[str, BatchBuilder]) -> None:
    sock.send_multipart(protocol.encode("ready", {
        "worker": spec.worker_id, "pid": os.getpid(), "host": socket.gethostname()}))
    while True:
        if not sock.poll(POLL_MS):
            if os.getppid() != spec.parent_pid:
                log.warning("server (pid %d) is gone; exiting", spec.parent_pid)
                return
            continue
        try:
            msg = protocol.decode(sock.recv_multipart(), allowed=frozenset({"task", "stop"}))
        except Exception as e:  # one bad message must not stop the worker
            log.error("dropped a malformed message from the server: %s", e)
            continue
        if msg.type == "stop":
            return
        sock.send_multipart(_run_task(msg, builders))


def _run_task(msg: protocol.Message, builders: dict[str, BatchBuilder]) -> list:
    started = time.perf_counter()
    builder = builders.get(msg["dataset"])
    try:
        if builder is None:
            raise RuntimeError(f"unknown dataset '{msg['dataset']}'")
        rows = builder.build(msg["epoch"], msg["index"], msg["slot"], msg.get("shard"))
    except Exception as e:
        log.error("batch %d of epoch %d of '%s' failed: %s", msg["index"], msg["epoch"], msg["dataset"], e)
        return protocol.encode("failed", {"task": msg["task"], "message": str(e)})
    busy = time.perf_counter() - started
    return protocol.encode("done", {"task": msg["task"], "rows": rows, "busy_s": busy})
