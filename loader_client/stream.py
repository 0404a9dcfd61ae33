"""BatchStream and the connection under it: handshake, credit-based prefetch, resume, stats.

One background thread owns the ZeroMQ socket (sockets must not be shared between threads);
callers, which may be several Keras enqueuer threads at once, only queue requests and wait on
a condition for the batch they asked for. Each request is one unit of credit: the server
never sends what was not asked for, so memory on both sides is bounded by the window.

Received arrays are `np.frombuffer` views on the ZeroMQ frames: no copy after the socket.
If the server goes quiet while batches are outstanding, the client pings it; a restarted
server answers "unknown client", and the client says hello again and re-asks for exactly the
batches it is still missing, so nothing is lost and nothing is delivered twice.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import zmq

from loader_client import protocol
from loader_client.security import ClientCurve

log = logging.getLogger(__name__)

PING_AFTER_S = 1.0
KEPT_EPOCHS = 4
DEFAULT_PREFETCH = 8
_ids = itertools.count()

Batch = tuple[np.ndarray, ...]
Key = tuple[int, int]
Curve = ClientCurve | tuple[str, str] | None


class ServerError(RuntimeError):
    """The server refused a request or could not build a batch; the message says why and,
    when a worker failed, ends with that worker's traceback."""


def error_text(msg: protocol.Message) -> str:
    """An `error` reply as a reader wants it: the server's message, then the traceback of the
    worker where the batch failed, re-raised in the spirit of torch's ExceptionWrapper."""
    tb = msg.get("traceback")
    if not tb:
        return msg["message"]
    body = tb.removeprefix("Traceback (most recent call last):\n")
    return f"{msg['message']}\n\nOriginal Traceback (most recent call last):\n{body}"


@dataclass(frozen=True)
class DatasetInfo:
    """What the server said about a dataset in its welcome."""

    dataset: str
    num_samples: int
    batch_size: int
    batches: int
    specs: tuple[protocol.ArraySpec, ...]  # one sample of each array


class Connection:
    """A session with one server for one dataset (and shard); thread-safe for callers."""

    def __init__(self, url: str, dataset: str = "train", *, timeout: float = 30.0,
                 shard: tuple[int, int] | None = None, curve: Curve = None) -> None:
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        self.url = url
        self.dataset = dataset
        self.timeout = timeout
        self._curve = as_curve(curve)
        self._shard = list(shard) if shard else None
        self._cv = threading.Condition()
        self._ready: dict[Key, Batch] = {}
        self._failed: dict[Key, str] = {}
        self._outstanding: set[Key] = set()
        self._outbox: list[Key] = []
        self._control: list[list] = []
        self._fatal: Exception | None = None
        self._closed = False
        self._rejoining = False
        self.info: DatasetInfo | None = None
        self.batches = 0
        self.bytes = 0
        self.wait_s = 0.0
        self.callers = 1
        self._blocked = 0
        self._returned: dict[int, int] = {}
        self._starved_since: float | None = None
        self.reconnects = 0
        # what the I/O thread does with each message the server may send, under self._cv
        self._handlers: dict[str, Callable[[protocol.Message], None]] = {
            "welcome": self._on_welcome, "batch": self._on_batch, "error": self._on_error,
            "pong": self._on_pong, "stats_reply": self._on_stray_stats,
        }
        self._ctx = zmq.Context.instance()
        self._wake_addr = f"inproc://npyloader-client-{id(self)}-{next(_ids)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._thread = threading.Thread(target=self._io_loop, name=f"npyloader-io-{dataset}", daemon=True)
        self._thread.start()
        self._handshake()

    # -- caller side ---------------------------------------------------------------------

    def _handshake(self) -> None:
        with self._cv:
            self._send_control(["hello"])
            answered = self._cv.wait_for(lambda: self.info is not None or self._fatal is not None, self.timeout)
        if not answered:
            self.close()
            raise TimeoutError(
                f"no answer from {self.url} within {self.timeout:g}s: is `npyloader serve` running "
                f"there and reachable? (check with `npyloader stats {self.url}`)")
        if self._fatal is not None:
            self.close()
            raise self._fatal

    def request(self, epoch: int, indices: list[int]) -> None:
        """Ask for batches ahead of need (prefetch); already requested ones are skipped."""
        with self._cv:
            self._check_open()
            self._request_locked(epoch, indices)

    def _request_locked(self, epoch: int, indices: list[int]) -> None:
        new = [(epoch, i) for i in indices
               if (epoch, i) not in self._outstanding and (epoch, i) not in self._ready]
        if new:
            self._outstanding.update(new)
            self._outbox.extend(new)
            self._wake()

    def get(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch`, waiting at most `timeout` seconds for it."""
        key = (epoch, index)
        with self._cv:
            self._check_open()
            self._request_locked(epoch, [index])
            self._blocked += 1
            self._account_wait(epoch)
            try:
                arrived = self._cv.wait_for(
                    lambda: key in self._ready or key in self._failed or self._fatal is not None or self._closed,
                    self.timeout)
            finally:
                self._blocked -= 1
                self._returned[epoch] = self._returned.get(epoch, 0) + 1
                if len(self._returned) > KEPT_EPOCHS:  # only recent epochs can still be fetched
                    del self._returned[min(self._returned)]
                self._account_wait(epoch)
            if key in self._ready:
                return self._ready.pop(key)
            if key in self._failed:
                raise ServerError(f"{self.url} could not build batch {index} of epoch {epoch} "
                                  f"of '{self.dataset}': {self._failed.pop(key)}")
            self._check_open()
            if not arrived:
                raise TimeoutError(
                    f"no batch {index} of epoch {epoch} from {self.url} within {self.timeout:g}s: "
                    f"is the server alive and are its workers running? (`npyloader stats {self.url}`)")
            raise AssertionError("unreachable")

    def _account_wait(self, epoch: int) -> None:
        """Training is starved while every loader thread that can still be fetching is blocked:
        with fewer blocked, Keras still has a finished batch in its queue. Near an epoch's end
        fewer threads than `callers` have a batch left to fetch, so the bar is the smaller of
        the two. With one caller this is simply the time spent blocked in `get`."""
        left = self.info.batches - self._returned.get(epoch, 0) if self.info is not None else self.callers
        starved = self._blocked > 0 and self._blocked >= min(self.callers, max(left, 1))
        now = time.perf_counter()
        if starved and self._starved_since is None:
            self._starved_since = now
        elif not starved and self._starved_since is not None:
            self.wait_s += now - self._starved_since
            self._starved_since = None

    def cancel_other_epochs(self, keep_epoch: int) -> None:
        """Forget batches of other epochs: the server drops them from its queue too."""
        with self._cv:
            self._outstanding = {k for k in self._outstanding if k[0] == keep_epoch}
            self._outbox = [k for k in self._outbox if k[0] == keep_epoch]
            self._ready = {k: v for k, v in self._ready.items() if k[0] == keep_epoch}
            self._send_control(["cancel", keep_epoch])

    def server_stats(self) -> dict:
        return request_stats(self.url, self.timeout)

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise RuntimeError(f"the connection to {self.url} is closed")

    def _send_control(self, item: list) -> None:
        self._control.append(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending; the I/O thread will see everything queued

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._send_control(["bye"])
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        self._wake_tx.close(0)

    # -- I/O thread ----------------------------------------------------------------------

    def _io_loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self.url)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        last_heard = last_ping = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(int(PING_AFTER_S * 500)))
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                if not self._flush(sock):
                    return
                if sock in events:
                    last_heard = time.monotonic()
                    for _ in range(64):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                now = time.monotonic()
                if now - last_heard > PING_AFTER_S and now - last_ping > PING_AFTER_S and self._outstanding:
                    sock.send_multipart(protocol.encode("ping"))
                    last_ping = now
        finally:
            sock.close()
            self._wake_rx.close(0)

    def _flush(self, sock: zmq.Socket) -> bool:
        """Send queued control messages and requests. False once the connection is closed."""
        with self._cv:
            control, self._control = self._control, []
            outbox, self._outbox = self._outbox, []
            wait_s = self.wait_s
        for item in control:
            if item[0] == "hello":
                sock.send_multipart(protocol.encode("hello", {"dataset": self.dataset, "shard": self._shard}))
            elif item[0] == "cancel":
                sock.send_multipart(protocol.encode("cancel", {"keep_epoch": item[1]}))
            elif item[0] == "bye":
                sock.send_multipart(protocol.encode("bye"))
                return False
        by_epoch: dict[int, list[int]] = {}
        for epoch, index in outbox:
            by_epoch.setdefault(epoch, []).append(index)
        for epoch, indices in by_epoch.items():
            for start in range(0, len(indices), protocol.MAX_CREDIT):
                sock.send_multipart(protocol.encode("request", {
                    "epoch": epoch, "batches": indices[start:start + protocol.MAX_CREDIT], "wait_s": wait_s}))
        return True

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = protocol.decode(frames, allowed=protocol.SERVER_TO_CLIENT)
        except Exception as e:  # never let one bad message stop the I/O thread (a validator bug included)
            log.error("dropped a malformed message from %s: %s", self.url, e)
            return
        with self._cv:
            self._handlers[msg.type](msg)
            self._cv.notify_all()

    def _on_batch(self, msg: protocol.Message) -> None:
        key = (msg["epoch"], msg["index"])
        if key not in self._outstanding:
            return  # not asked for, or cancelled since
        self._outstanding.discard(key)
        problem = self._unlike_welcome(msg.arrays)
        if problem:
            self._failed[key] = problem
        else:
            self._ready[key] = tuple(msg.arrays.values())
            self.batches += 1
            self.bytes += sum(a.nbytes for a in msg.arrays.values())

    def _on_pong(self, msg: protocol.Message) -> None:
        """Nothing more to do: hearing from the server at all is what resets the ping timer."""

    def _on_stray_stats(self, msg: protocol.Message) -> None:
        """This socket never asks for stats (`request_stats` uses a socket of its own)."""
        log.debug("ignored a stats reply from %s that this session did not ask for", self.url)

    def _unlike_welcome(self, arrays: dict[str, np.ndarray]) -> str | None:
        """Why a batch breaks what the welcome promised, or None. The schema only makes each array
        well-formed; a batch missing `y`, in another dtype or sample shape, or with more rows than
        a batch, would otherwise reach the caller as if it were the batch asked for."""
        assert self.info is not None  # batches are asked for only after the welcome
        specs, limit = list(self.info.specs), self.info.batch_size
        got = [protocol.ArraySpec(name, a.dtype.str, a.shape[1:]) for name, a in arrays.items()]
        rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if got == specs and len(rows) == 1 and 0 <= min(rows) <= limit:
            return None
        return (f"it arrived as {[(name, a.dtype.str, a.shape) for name, a in arrays.items()]}, but the "
                f"welcome promised up to {limit} rows of {specs}")

    def _on_welcome(self, msg: protocol.Message) -> None:
        info = DatasetInfo(msg["dataset"], msg["num_samples"], msg["batch_size"], msg["batches"],
                           tuple(protocol.ArraySpec.from_wire(s) for s in msg["specs"]))
        if self.info is not None and info != self.info:
            self._fatal = ServerError(
                f"{self.url} came back serving a different '{self.dataset}' ({info}) than before "
                f"({self.info}); restart training against one configuration")
            return
        if self.info is not None:
            self.reconnects += 1
            log.warning("%s restarted; resuming %d outstanding batch(es)", self.url, len(self._outstanding))
            self._outbox.extend(sorted(self._outstanding))
        self._rejoining = False
        self.info = info

    def _on_error(self, msg: protocol.Message) -> None:
        code, text = msg["code"], error_text(msg)
        if code == "unknown_client":
            if self.info is not None and not self._rejoining:
                self._rejoining = True
                self._send_control(["hello"])
            return
        if code == "unknown_dataset" or (code == "bad_message" and self.info is None):
            self._fatal = ValueError(f"{self.url}: {text}")
        elif "epoch" in msg.fields and "index" in msg.fields:
            key = (msg["epoch"], msg["index"])
            if key in self._outstanding:  # else not asked for, or cancelled: kept, it would fail a later ask
                self._outstanding.discard(key)
                self._failed[key] = text
        else:
            self._fatal = ServerError(f"{self.url} refused a request: {text}")


def as_curve(curve: Curve) -> ClientCurve | None:
    """`curve=` accepts a ClientCurve or (this peer's .key_secret, the server's .key)."""
    if curve is None or isinstance(curve, ClientCurve):
        return curve
    secret_key_file, server_key_file = curve
    return ClientCurve.from_files(secret_key_file, server_key_file)


def request_stats(url: str, timeout: float = 5.0, curve: Curve = None) -> dict:
    """One stats round trip on a throwaway socket: usable without a dataset session."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys = as_curve(curve)
    if keys is not None:
        keys.apply(sock)
    try:
        sock.connect(url)
        sock.send_multipart(protocol.encode("stats"))
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer from {url} within {timeout:g}s: is `npyloader serve` running there?")
        # the stats list every client and every worker (with its host name), so with enough of
        # them they outgrow an ordinary header
        msg = protocol.decode(sock.recv_multipart(), allowed=protocol.SERVER_TO_CLIENT,
                              max_header_bytes=protocol.MAX_SETUP_BYTES)
        if msg.type == "error":
            raise ServerError(f"{url}: {error_text(msg)}")
        if msg.type != "stats_reply":
            raise ServerError(f"{url} answered a stats request with '{msg.type}'")
        return msg["stats"]
    finally:
        sock.close(0)


class BatchStream:
    """Iterate the batches of one epoch in index order, `(x, y)` each; no Keras needed.

    `prefetch` batches are kept requested ahead of the one being read, so workers stay busy
    while the caller works. Iterating again continues with the next epoch.
    """

    def __init__(self, url: str, dataset: str = "train", epoch: int = 0, timeout: float = 30.0,
                 prefetch: int = DEFAULT_PREFETCH, shard: tuple[int, int] | None = None, curve: Curve = None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.epoch = epoch
        self.prefetch = prefetch
        self._conn = Connection(url, dataset, timeout=timeout, shard=shard, curve=curve)

    @property
    def info(self) -> DatasetInfo:
        assert self._conn.info is not None
        return self._conn.info

    def __len__(self) -> int:
        return self.info.batches

    def __iter__(self) -> Iterator[Batch]:
        n, epoch = len(self), self.epoch
        self._conn.request(epoch, list(range(min(self.prefetch, n))))
        for i in range(n):
            if i + self.prefetch < n:
                self._conn.request(epoch, [i + self.prefetch])
            yield self._conn.get(epoch, i)
        self.epoch += 1

    def stats(self) -> dict:
        c = self._conn
        return {"batches": c.batches, "bytes": c.bytes, "wait_s": c.wait_s, "reconnects": c.reconnects}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
