"""BatchStream and the connection under it: handshake, credit-based prefetch, resume, stats.

One background thread owns the ZeroMQ socket (sockets must not be shared between threads);
callers, which may be several Keras enqueuer threads at once, only queue requests and wait on
a condition for the batch they asked for. Each request is one unit of credit: the server
never sends what was not asked for, so memory on both sides is bounded by the window.

Received arrays are `np.frombuffer` views on the ZeroMQ frames: no copy after the socket. On
the server's own host the bytes skip the socket altogether: the client maps the dataset's
shared-memory slots read-only and receives only which slot holds each batch (`shm.py`); it
gives each slot back once nothing in the program refers to that batch any more. Which way
is negotiated at hello (`transport="auto"`); where shared memory cannot be read, the client
logs why once and uses the socket.
If the server goes quiet while batches are outstanding, the client pings it; a restarted
server answers "unknown client", and the client says hello again and re-asks for exactly the
batches it is still missing, so nothing is lost and nothing is delivered twice.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import zmq

from loader_client import endpoints, protocol
from loader_client.security import ClientCurve
from loader_client.shm import LeaseTag, Offer, Segment, ShmUnavailable, Waker

log = logging.getLogger(__name__)

PING_AFTER_S = 1.0
KEPT_EPOCHS = 4
DEFAULT_PREFETCH = 8
TRANSPORTS = ("auto", "shm", "socket")
# Slots kept free for batches in flight when the program itself holds many batches read from
# shared memory: past that, a batch is copied out and its slot given back at once.
SPARE_SLOTS = 2

ROUTING_ID_BYTES = 16

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
                 shard: tuple[int, int] | None = None, curve: Curve = None, transport: str = "auto") -> None:
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.endpoint = endpoints.parse(url, "url", bind=False)
        self.url = url
        self.routing_id = new_routing_id()  # kept across reconnects: a restarted server still tells clients apart
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
        self.wanted_transport = transport
        self.transport = "socket"             # what batches arrive by now
        self.transport_reason: str | None = None  # why not shared memory, when it was wanted
        self._segment: Segment | None = None  # attached: lent slots are read from here
        self._attaching: Segment | None = None
        self._session = 0                     # bumped by each welcome: slots of older sessions are not ours to give back
        self._max_held = 0
        self._ready_tags: dict[Key, LeaseTag] = {}
        self._released: deque[LeaseTag] = deque()  # appended by lease finalizers, in any thread
        self._lent_live = 0                   # slots lent to us and not yet given back
        self._handed_live = 0                 # of those, batches the program got and still holds
        self.copied = 0
        # what the I/O thread does with each message the server may send, under self._cv
        self._handlers: dict[str, Callable[[protocol.Message], None]] = {
            "welcome": self._on_welcome, "batch": self._on_batch, "error": self._on_error,
            "pong": self._on_pong, "stats_reply": self._on_stray_stats,
            "slot": self._on_slot, "attached": self._on_attached,
        }
        self._ctx = zmq.Context.instance()
        self._waker = Waker()
        self._thread = threading.Thread(target=self._io_loop, name=f"npyloader-io-{dataset}", daemon=True)
        self._thread.start()
        self._handshake()

    # -- caller side ---------------------------------------------------------------------

    def _handshake(self) -> None:
        with self._cv:
            self._send_control(["hello"])
            answered = self._cv.wait_for(
                lambda: (self.info is not None and self._attaching is None) or self._fatal is not None, self.timeout)
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
                arrived = self._wait_for_batch(key)
            finally:
                self._blocked -= 1
                self._returned[epoch] = self._returned.get(epoch, 0) + 1
                if len(self._returned) > KEPT_EPOCHS:  # only recent epochs can still be fetched
                    del self._returned[min(self._returned)]
                self._account_wait(epoch)
            if key in self._ready:
                return self._hand_out(key)
            if key in self._failed:
                raise ServerError(f"{self.url} could not build batch {index} of epoch {epoch} "
                                  f"of '{self.dataset}': {self._failed.pop(key)}")
            self._check_open()
            if not arrived:
                raise TimeoutError(
                    f"no batch {index} of epoch {epoch} from {self.url} within {self.timeout:g}s: "
                    f"is the server alive and are its workers running? (`npyloader stats {self.url}`)")
            raise AssertionError("unreachable")

    def _wait_for_batch(self, key: Key) -> bool:
        """Wait (under the lock) until `key` is ready or failed, or the session ends; False on
        timeout. Two callers may wait for one batch (Keras abandons the threads of the passes it
        reads to learn the batches' shapes, and the pass that follows asks for the same batches):
        the first takes it, and the other, finding it neither ready nor on its way any more, asks
        the server for it again rather than wait for a batch that will never come."""
        deadline = time.monotonic() + self.timeout
        while True:
            arrived = self._cv.wait_for(
                lambda: key in self._ready or key in self._failed or self._fatal is not None or self._closed
                or key not in self._outstanding, deadline - time.monotonic())
            if not arrived or key in self._ready or key in self._failed or self._fatal is not None or self._closed:
                return arrived
            self._request_locked(key[0], [key[1]])

    def _hand_out(self, key: Key) -> Batch:
        """The ready batch, given to the program. One read from a lent slot is handed over as
        views, unless the program already holds so many that the server could lend no slot for
        the batches in flight: then it is copied out and the slot given back at once, so a
        program that keeps every batch slows down but never stalls."""
        batch = self._ready.pop(key)
        tag = self._ready_tags.pop(key, None)
        if tag is None:
            return batch
        if self._handed_live >= self._max_held - SPARE_SLOTS:
            self.copied += 1
            return tuple(np.array(a) for a in batch)
        tag.handed = True
        self._handed_live += 1
        return batch

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

    def restart_epoch(self, epoch: int) -> None:
        """A pass over `epoch` starts again from its first batch (Keras read a few before it, to
        learn their shapes): count the batches left in it afresh, for the wait near its end."""
        with self._cv:
            self._returned.pop(epoch, None)

    def cancel_other_epochs(self, keep_epoch: int) -> None:
        """Forget batches of other epochs: the server drops them from its queue too."""
        with self._cv:
            self._outstanding = {k for k in self._outstanding if k[0] == keep_epoch}
            self._outbox = [k for k in self._outbox if k[0] == keep_epoch]
            self._ready = {k: v for k, v in self._ready.items() if k[0] == keep_epoch}
            self._ready_tags = {k: v for k, v in self._ready_tags.items() if k[0] == keep_epoch}
            self._send_control(["cancel", keep_epoch])

    def server_stats(self) -> dict:
        return request_stats(self.url, self.timeout)

    def stats(self) -> dict:
        """What arrived and how: `id` is this client's row in `npyloader stats`; `transport` is
        "shm" or "socket" (`transport_reason` says why not shared memory when it was wanted);
        `copied` counts batches copied out of shared memory because the program held too many."""
        return {"id": self.routing_id.hex(), "batches": self.batches, "bytes": self.bytes, "wait_s": self.wait_s,
                "reconnects": self.reconnects, "transport": self.transport, "transport_reason": self.transport_reason,
                "copied": self.copied}

    @property
    def max_held(self) -> int:
        """How many slots the server lends this client at most (0 over the socket)."""
        return self._max_held if self.transport == "shm" else 0

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise RuntimeError(f"the connection to {self.url} is closed")

    def _send_control(self, item: list) -> None:
        self._control.append(item)
        self._wake()

    def _wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        """End the session. Batches not yet read give their slots back first; arrays the program
        still holds stay valid for the server's --client-timeout (60 s by default)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._ready.clear()
            self._ready_tags.clear()
            self._send_control(["bye"])
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    # -- I/O thread ----------------------------------------------------------------------

    def _io_loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if self._curve is not None:
            self._curve.apply(sock)
        self.endpoint.prepare(sock)
        sock.connect(self.url)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.rfd, zmq.POLLIN)
        last_heard = last_ping = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(int(PING_AFTER_S * 500)))
                if self._waker.rfd in events:
                    self._waker.drain()
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
                # a client still holding lent slots stays in touch, or the server would reclaim them
                if (now - last_heard > PING_AFTER_S and now - last_ping > PING_AFTER_S
                        and (self._outstanding or self._lent_live)):
                    sock.send_multipart(protocol.encode("ping"))
                    last_ping = now
        finally:
            sock.close()

    def _flush(self, sock: zmq.Socket) -> bool:
        """Send queued control messages, requests and slot releases (riding on a request where
        there is one). Releases go before a bye. False once the connection is closed."""
        with self._cv:
            control, self._control = self._control, []
            outbox, self._outbox = self._outbox, []
            wait_s = self.wait_s
            releases = self._take_releases()
        bye = False
        for item in control:
            if item[0] == "hello":
                sock.send_multipart(protocol.encode("hello", {"dataset": self.dataset, "shard": self._shard}))
            elif item[0] == "attach":
                sock.send_multipart(protocol.encode("attach", {"nonce": item[1]}))
            elif item[0] == "cancel":
                sock.send_multipart(protocol.encode("cancel", {"keep_epoch": item[1]}))
            elif item[0] == "bye":
                bye = True
        by_epoch: dict[int, list[int]] = {}
        for epoch, index in outbox:
            by_epoch.setdefault(epoch, []).append(index)
        for epoch, indices in by_epoch.items():
            for start in range(0, len(indices), protocol.MAX_CREDIT):
                fields = {"epoch": epoch, "batches": indices[start:start + protocol.MAX_CREDIT], "wait_s": wait_s}
                if releases:
                    fields["release"], releases = releases[:protocol.MAX_CREDIT], releases[protocol.MAX_CREDIT:]
                sock.send_multipart(protocol.encode("request", fields))
        for start in range(0, len(releases), protocol.MAX_CREDIT):
            sock.send_multipart(protocol.encode("release", {"slots": releases[start:start + protocol.MAX_CREDIT]}))
        if bye:
            sock.send_multipart(protocol.encode("bye"))
        return not bye

    def _take_releases(self) -> list[list[int]]:
        """The slots whose batches nothing refers to any more, as [slot, generation] pairs of
        this session (a restarted server lent the older ones, and they died with it)."""
        pairs = []
        while self._released:
            tag = self._released.popleft()
            if tag.session != self._session:
                continue
            self._lent_live -= 1
            if tag.handed:
                self._handed_live -= 1
            pairs.append([tag.slot, tag.gen])
        return pairs

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

    def _on_slot(self, msg: protocol.Message) -> None:
        """A batch lent in shared memory. Whatever becomes of it (read, not asked for, refused),
        its slot is given back once nothing refers to it."""
        key = (msg["epoch"], msg["index"])
        tag = LeaseTag(self._session, msg["slot"], msg["gen"])
        self._lent_live += 1
        if self._segment is None:
            problem = "the server lent a shared-memory slot to a client that is not attached"
            arrays: tuple[np.ndarray, ...] = ()
            self._released.append(tag)
        else:
            try:
                arrays = self._segment.read(msg["slot"], msg["rows"], tag, self._released, self._waker)
                problem = None
            except ValueError as e:
                arrays, problem = (), f"the server lent a slot this client cannot read: {e}"
                self._released.append(tag)
        if key not in self._outstanding:
            return  # not asked for, or cancelled: dropping the views gives the slot back
        self._outstanding.discard(key)
        if problem is None:
            assert self.info is not None
            problem = self._unlike_welcome(dict(zip((n for n, _, _ in self.info.specs), arrays)))
        if problem:
            self._failed[key] = problem
            return
        self._ready[key] = arrays
        self._ready_tags[key] = tag
        self.batches += 1
        self.bytes += sum(a.nbytes for a in arrays)

    def _on_attached(self, msg: protocol.Message) -> None:
        if self._attaching is None:
            return
        self._segment, self._attaching = self._attaching, None
        self._max_held = msg["max_held"]
        self.transport, self.transport_reason = "shm", None
        log.info("%s: reading '%s' from shared memory (%s)", self.url, self.dataset, self._segment.offer.segment)

    def _attach(self, offer: dict | None) -> None:
        """After a welcome: map the server's segment and prove it by its nonce, or say why not."""
        self._segment = None
        self.transport = "socket"
        if self.wanted_transport == "socket":
            return
        assert self.info is not None
        try:
            if offer is None:
                raise ShmUnavailable("the server has no local workers, so no shared-memory slots")
            segment = Segment(Offer.from_welcome(offer), self.info.specs, self.info.batch_size)
        except ShmUnavailable as e:
            self._no_shm(str(e))
            return
        self._attaching = segment
        self._send_control(["attach", segment.nonce])

    def _no_shm(self, reason: str) -> None:
        self._attaching = None
        if self.wanted_transport == "shm":
            self._fatal = ShmUnavailable(f"{self.url}: transport='shm', but {reason}")
        elif reason != self.transport_reason:
            log.info("%s: reading '%s' over the socket, not shared memory: %s", self.url, self.dataset, reason)
        self.transport_reason = reason

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
        self._session += 1
        self._attach(msg.get("shm"))

    def _on_error(self, msg: protocol.Message) -> None:
        code, text = msg["code"], error_text(msg)
        if code == "shm_refused":
            self._no_shm(text)
            return
        if code == "bad_release":  # a bug, but only in bookkeeping: the batches already arrived
            log.error("%s refused a slot release: %s", self.url, text)
            return
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


def new_routing_id() -> bytes:
    """A random routing id for a DEALER, set before it connects. Left to itself, the server's
    ROUTER numbers its peers from the same value in every process (00 6b8b4567, then ...68):
    a restarted server hands one client's old id to another, merging the two in stats and
    metrics. With its own id, a client that reconnects is still itself. libzmq reserves ids
    that start with a zero byte."""
    return bytes([1 + secrets.randbelow(255)]) + secrets.token_bytes(ROUTING_ID_BYTES - 1)


def as_curve(curve: Curve) -> ClientCurve | None:
    """`curve=` accepts a ClientCurve or (this peer's .key_secret, the server's .key)."""
    if curve is None or isinstance(curve, ClientCurve):
        return curve
    secret_key_file, server_key_file = curve
    return ClientCurve.from_files(secret_key_file, server_key_file)


def request_stats(url: str, timeout: float = 5.0, curve: Curve = None) -> dict:
    """One stats round trip on a throwaway socket: usable without a dataset session."""
    endpoint = endpoints.parse(url, "url", bind=False)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
    keys = as_curve(curve)
    if keys is not None:
        keys.apply(sock)
    endpoint.prepare(sock)
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


def epoch_batches(conn: Connection, epoch: int, batches: int, prefetch: int) -> Iterator[Batch]:
    """Batches 0..batches-1 of `epoch` in index order, with `prefetch` of them kept requested
    ahead of the one being read, so workers stay busy while the caller works."""
    conn.request(epoch, list(range(min(prefetch, batches))))
    for i in range(batches):
        if i + prefetch < batches:
            conn.request(epoch, [i + prefetch])
        yield conn.get(epoch, i)


class BatchStream:
    """Iterate the batches of one epoch in index order, `(x, y)` each; no Keras needed.

    `prefetch` batches are kept requested ahead of the one being read, so workers stay busy
    while the caller works. Iterating again continues with the next epoch.
    """

    def __init__(self, url: str, dataset: str = "train", epoch: int = 0, timeout: float = 30.0,
                 prefetch: int = DEFAULT_PREFETCH, shard: tuple[int, int] | None = None, curve: Curve = None,
                 transport: str = "auto") -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.epoch = epoch
        self.prefetch = prefetch
        self._conn = Connection(url, dataset, timeout=timeout, shard=shard, curve=curve, transport=transport)

    @property
    def info(self) -> DatasetInfo:
        assert self._conn.info is not None
        return self._conn.info

    def __len__(self) -> int:
        return self.info.batches

    def __iter__(self) -> Iterator[Batch]:
        yield from epoch_batches(self._conn, self.epoch, len(self), self.prefetch)
        self.epoch += 1

    def stats(self) -> dict:
        return self._conn.stats()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
