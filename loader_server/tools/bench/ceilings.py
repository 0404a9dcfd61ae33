"""Upper bounds for `npyloader bench`: how fast the same bytes can move here at all.

A loader's MB/s is only readable next to what the machine allows on the same day: raw ZeroMQ
between two processes (the one hop npyloader cannot avoid) and a plain memory copy (what any
loader must do at least once). Each function returns bytes per second over `seconds`, after a
short warm-up, and leaves nothing behind: the sender process is joined (or killed), ipc socket
files are removed, and every wait has a deadline.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event

import numpy as np
import zmq

log = logging.getLogger(__name__)

IO_BATCH_BYTES = 64 * 128 * 128 * 4
WARMUP_S = 0.2
START_TIMEOUT_S = 60.0
RECV_TIMEOUT_MS = 5_000
SEND_TIMEOUT_MS = 100
JOIN_TIMEOUT_S = 10.0


def _send_frames(endpoint: str, frame_bytes: int, stop: Event, deadline_s: float) -> None:
    """The sender process: PUSH one buffer, zero-copy, until told to stop or out of time.

    Sends time out so that a receiver that stopped reading cannot keep it blocked past `stop`.
    """
    frame = np.ones(frame_bytes, np.uint8)
    end = time.monotonic() + deadline_s
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.connect(endpoint)
    try:
        while not stop.is_set() and time.monotonic() < end:
            try:
                sock.send(frame, copy=False)
            except zmq.Again:
                continue
    finally:
        sock.close()
        ctx.term()


@contextmanager
def _endpoint(transport: str) -> Iterator[str]:
    """A bindable endpoint; an ipc one lives in a temporary folder removed afterwards."""
    if transport == "tcp":
        yield "tcp://127.0.0.1:0"
    elif transport == "ipc":
        folder = tempfile.mkdtemp(prefix="npyloader-ceiling-")
        try:
            yield f"ipc://{folder}/push.sock"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        raise ValueError(f"transport must be 'tcp' or 'ipc', got {transport!r}")


def _receive_for(sock: zmq.Socket, seconds: float) -> int:
    """Bytes received in `seconds`: recv(copy=False), viewed as numpy as a client would."""
    received = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        frame = sock.recv(copy=False)
        received += np.frombuffer(frame.buffer, np.uint8).nbytes
    return received


def _await_sender(sock: zmq.Socket, sender: multiprocessing.process.BaseProcess) -> None:
    """Wait for the first frame, failing fast if the sender process died while starting."""
    end = time.monotonic() + START_TIMEOUT_S
    while not sock.poll(100):
        if not sender.is_alive():
            raise RuntimeError(f"the ceiling sender exited with {sender.exitcode} before sending")
        if time.monotonic() > end:
            raise TimeoutError(f"the ceiling sender sent nothing within {START_TIMEOUT_S:g}s")
    sock.recv(copy=False)


def _stop_sender(sender: multiprocessing.process.BaseProcess, stop: Event) -> None:
    stop.set()
    sender.join(JOIN_TIMEOUT_S)
    if sender.is_alive():
        log.warning("ceiling sender %d did not stop within %gs; killing it", sender.pid, JOIN_TIMEOUT_S)
        sender.kill()
        sender.join(JOIN_TIMEOUT_S)


def raw_zmq(transport: str, frame_bytes: int = IO_BATCH_BYTES, seconds: float = 2.0) -> float:
    """Bytes/s a PULL socket receives from a PUSH socket in a spawned process, zero-copy both ends."""
    spawn = multiprocessing.get_context("spawn")
    ctx = zmq.Context()
    with _endpoint(transport) as bind:
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        stop = spawn.Event()
        sender = None
        try:
            sock.bind(bind)
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            budget = START_TIMEOUT_S + WARMUP_S + seconds + 10
            process = spawn.Process(target=_send_frames, args=(endpoint, frame_bytes, stop, budget),
                                    name="npyloader-ceiling-sender", daemon=True)
            process.start()
            sender = process
            _await_sender(sock, sender)
            _receive_for(sock, WARMUP_S)
            start = time.perf_counter()
            received = _receive_for(sock, seconds)
            rate = received / (time.perf_counter() - start)
        except zmq.Again as e:
            raise TimeoutError(f"raw zmq over {transport}: no frame for {RECV_TIMEOUT_MS} ms") from e
        finally:
            if sender is not None:
                _stop_sender(sender, stop)
            sock.close()
            ctx.term()
    log.info("raw zmq %s, %d-byte frames: %.2f GB/s", transport, frame_bytes, rate / 1e9)
    return rate


def memcpy(frame_bytes: int = IO_BATCH_BYTES, seconds: float = 2.0) -> float:
    """Bytes/s `np.copyto` moves between two preallocated arrays: one copy, no process boundary."""
    src = np.ones(frame_bytes, np.uint8)
    dst = np.zeros(frame_bytes, np.uint8)
    end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end:
        np.copyto(dst, src)
    copies = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        np.copyto(dst, src)
        copies += 1
    rate = copies * frame_bytes / elapsed
    log.info("memcpy, %d-byte frames: %.2f GB/s", frame_bytes, rate / 1e9)
    return rate
