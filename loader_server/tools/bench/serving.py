"""npyloader's own bench rows: a real server per row, read the way a trainer would read it.

A row's spec says how: `transport` "tcp" or "ipc" (the socket) or "shm" (the same-host path,
tcp for the control messages); `fit` reads through `RemoteSequence` as `model.fit` does
(via_fit.py) instead of through a bare `BatchStream`; `copy` has the consumer copy each batch
into its own memory (what one copy per batch costs, against zero-copy views);
`clients` > 1 starts that many client processes at once, each reading its shard, and reports
their aggregate; `remote` adds that many remote worker processes (the relay path).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loader_server.tools.bench.procs import (
    JOIN,
    children,
    npyloader_process,
    peak_rss_mb,
    private_mb,
    stop,
)
from loader_server.tools.bench.workload import ROWS_PER_FILE, Workload
from loader_server.tools.local_server import READY, wait_for_line

CLIENT_TIMEOUT_S = 120
PREFETCH = 16
TRANSPORT = {"tcp": "socket", "ipc": "socket", "shm": "shm"}

Epochs = Callable[[int], Iterator[tuple[np.ndarray, ...]]]


def npyloader_run(spec: dict[str, Any], folder: Path, wl: Workload, tmp: Path) -> tuple[Epochs, Callable[[], dict]]:
    """Start the row's server (and remote worker); its epochs, and a close() giving memory figures."""
    server, worker, url = _start(spec, folder, wl, tmp)
    try:
        if spec.get("clients", 1) > 1:
            epochs, close_client = _many_clients(url, spec)
        elif spec.get("fit"):
            epochs, close_client = _through_fit(url, spec)
        else:
            epochs, close_client = _stream(url, spec)
    except BaseException:
        stop(worker, server)
        raise

    def close() -> dict:
        close_client()
        workers = children(server.pid)
        memory = {"server_rss_mb": peak_rss_mb(server.pid),
                  "worker_rss_mb": max((peak_rss_mb(p) for p in workers), default=0.0),
                  "server_private_mb": private_mb(server.pid) + sum(private_mb(p) for p in workers)}
        stop(worker, server)
        return memory

    return epochs, close


def _start(spec: dict[str, Any], folder: Path, wl: Workload, tmp: Path) -> tuple[Any, Any, str]:
    from loader_client import request_stats

    bind = f"ipc://{tmp}/clients" if spec["transport"] == "ipc" else "tcp://127.0.0.1:0"
    args = ["serve", "--data", str(folder), "--label-column", "-1", "--x-shape", f"{wl.side},{wl.side}",
            "--batch-size", str(ROWS_PER_FILE), "--workers", str(spec["workers"]), "--bind", bind,
            "--index-cache", str(tmp / "cache")]
    for op in wl.augment:
        args += ["--augment", op]
    if spec.get("remote"):
        args += ["--worker-bind", "tcp://127.0.0.1:0"]
    server = npyloader_process(*args, log_path=tmp / "server.log")
    worker = None
    try:
        url = wait_for_line(server, tmp / "server.log", READY)
        if spec.get("remote"):
            joined = JOIN.search((tmp / "server.log").read_text()).group(1)
            worker = npyloader_process("worker", "--connect", joined, "--processes", str(spec["remote"]),
                               log_path=tmp / "worker.log")
            deadline = time.monotonic() + CLIENT_TIMEOUT_S
            while len(request_stats(url)["workers"]["list"]) < spec["workers"] + spec["remote"]:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"the remote worker did not join: {(tmp / 'worker.log').read_text()[-1000:]}")
                time.sleep(0.05)
    except BaseException:
        stop(worker, server)
        raise
    return server, worker, url


def _check_transport(stats: dict, spec: dict[str, Any]) -> None:
    """A row labelled shm that fell back to the socket would report the socket's figures."""
    if spec["transport"] == "shm" and stats["transport"] != "shm":
        raise RuntimeError(f"asked for shared memory but read over the socket: {stats['transport_reason']}")


def _stream(url: str, spec: dict[str, Any]) -> tuple[Epochs, Callable[[], None]]:
    from loader_client import BatchStream

    stream = BatchStream(url, timeout=CLIENT_TIMEOUT_S, prefetch=PREFETCH, transport=TRANSPORT[spec["transport"]])
    _check_transport(stream.stats(), spec)

    def epoch(n: int) -> Iterator[tuple[np.ndarray, ...]]:
        stream.epoch = n
        if spec.get("copy"):
            return (tuple(np.array(a) for a in batch) for batch in stream)
        return iter(stream)

    return epoch, stream.close


def _through_fit(url: str, spec: dict[str, Any]) -> tuple[Epochs, Callable[[], None]]:
    """What `fit` sees: RemoteSequence handed to Keras's own adapter and TFEpochIterator
    (via_fit.py), as the other loaders' rows through fit are."""
    from loader_client import RemoteSequence
    from loader_server.tools.bench.harness import FitInput, FitLoader
    from loader_server.tools.bench.via_fit import through_fit

    def start(first_epoch: int) -> FitInput:
        seq = RemoteSequence(url, timeout=CLIENT_TIMEOUT_S, transport=TRANSPORT[spec["transport"]], epoch=first_epoch)
        _check_transport(seq.stats(), spec)

        def set_epoch(n: int) -> None:
            seq.epoch = n

        return FitInput(seq, on_epoch_begin=set_epoch, stop=seq.close)

    baseline = through_fit(FitLoader("npyloader", start))
    return baseline.epoch, baseline.close


def epochs_per_call(spec: dict[str, Any]) -> int:
    """Whole epochs' worth of samples one timed call delivers (see _many_clients)."""
    return spec.get("clients", 1)


def _many_clients(url: str, spec: dict[str, Any]) -> tuple[Epochs, Callable[[], None]]:
    """`clients` trainer processes reading their shards at once. Each timed call starts them all
    and yields, per client, one empty stand-in batch carrying its byte count, so the caller's
    timing covers the slowest client and its byte count their sum. A shard of one epoch is only
    a few batches, as many as one client's prefetch window, so each client reads its shard of
    `clients` consecutive epochs per call: as many batches as one client reads in one epoch,
    which keeps the windows' fill and drain from dominating the figure."""
    ctx = mp.get_context("spawn")
    n = spec["clients"]
    go, done = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_shard_client, args=(url, rank, n, TRANSPORT[spec["transport"]], go, done),
                         daemon=True) for rank in range(n)]
    for p in procs:
        p.start()

    def epoch(e: int) -> Iterator[tuple[np.ndarray, ...]]:
        for _ in procs:
            go.put(e)
        for _ in procs:
            outcome = done.get(timeout=CLIENT_TIMEOUT_S)
            if isinstance(outcome, str):
                raise RuntimeError(outcome)
            yield (np.empty(outcome, np.uint8),)

    def close() -> None:
        for _ in procs:
            go.put(None)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()

    return epoch, close


def _shard_client(url: str, rank: int, world: int, transport: str, go: Any, done: Any) -> None:
    """One trainer of several: read shard `rank` of each epoch it is told; report its bytes."""
    from loader_client import BatchStream

    try:
        stream = BatchStream(url, timeout=CLIENT_TIMEOUT_S, prefetch=PREFETCH, shard=(rank, world), transport=transport)
    except Exception as e:  # reported to the parent, which fails the row with it
        done.put(f"client {rank}: {e}")
        return
    with stream:
        if transport == "shm" and stream.stats()["transport"] != "shm":
            done.put(f"client {rank} read over the socket: {stream.stats()['transport_reason']}")
            return
        while (e := go.get()) is not None:
            stream.epoch = e * world
            done.put(sum(sum(a.nbytes for a in batch) for _ in range(world) for batch in stream))
