"""The broker: routes batch requests from clients to workers and finished batches back.

Clients ask for specific (epoch, batch) pairs; each request is one unit of credit, and the
broker never sends a client more than it asked for. Requests wait in a per-client queue and
are dispatched round-robin across clients, so a train and a val stream (or two trainers)
share the pool fairly. Each worker takes as many tasks as its announced capacity, so faster
workers, asking again sooner, get more of the work.

A local worker fills a shared-memory slot. A client on this host that proved it maps the
same memory (`attach` with the segment's nonce) is told only which slot to read, and the slot
stays lent to it until it sends the slot back (`release`, or with its next request); one that
vanishes has its slots reclaimed after the client timeout, never sooner, so nothing is
overwritten under a live reader. Any other client gets the slot's bytes with `copy=False`,
and the slot is freed once ZeroMQ has let go of it. A remote worker sends the arrays inline,
and the broker forwards those very frames. A worker that dies, or stays silent past the
heartbeat timeout, has its batches put back at the front of their clients' queues: they are
redone, never lost and never sent twice. A silent local worker is killed before its slots
are reused, so a stopped process that wakes up cannot write into another batch.

Heartbeats come from a worker's socket thread, so a worker whose augment op hangs (in C, or
looping in Python) still looks alive. So each worker's current batch is timed, from when the
worker could start it (its previous one ended, or it was given the batch while idle), never
counting the time it waited in the worker's queue; past --task-timeout a local worker is killed
and its batches redone, and a remote one, which only its own host can kill, has its batches
redone elsewhere and gets no more until it has finished the ones it held, whose late results
are dropped.
"""

from __future__ import annotations

import errno
import logging
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from loader_client import protocol
from loader_server.config import DEFAULT_TASK_TIMEOUT_S
from loader_server.data.index import DatasetIndex
from loader_server.data.sampler import Plan
from loader_server.metrics import DatasetCounters
from loader_server.serve.pool import LocalPool
from loader_server.shm.slots import SlotPool

log = logging.getLogger(__name__)

IDLE_POLL_MS = 100
BUSY_POLL_MS = 2
SILENCE_BEATS = 3
MAX_BATCH_CRASHES = 3
RELAY_QUEUE = 16
LOCAL, REMOTE = b"L", b"R"  # which worker socket a worker is on: the first byte of its key


_SENT = zmq.MessageTracker()  # no frames, nothing to wait for: already done


@dataclass
class ServedDataset:
    name: str
    index: DatasetIndex
    plan: Plan
    specs: list[protocol.ArraySpec]  # one sample of each array
    slots: SlotPool | None
    index_s: float = 0.0
    counters: DatasetCounters = field(default_factory=DatasetCounters)

    def plan_for(self, shard: list[int] | None) -> Plan:
        return self.plan.for_shard(shard)


@dataclass
class Client:
    identity: bytes
    dataset: ServedDataset
    plan: Plan
    pending: deque[tuple[int, int]] = field(default_factory=deque)
    wanted: dict[tuple[int, int], float] = field(default_factory=dict)  # asked for, not yet sent: when asked
    crashes: Counter[tuple[int, int]] = field(default_factory=Counter)
    held: int = 0
    relaying: int = 0
    shm: bool = False                                      # attached: reads batches from the slots
    leases: dict[int, int] = field(default_factory=dict)   # slot -> generation lent to this client
    closed: bool = False                                   # said bye while still holding slots
    batches: int = 0
    bytes: int = 0
    wait_s: float = 0.0
    since: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Task:
    id: int
    client: bytes
    dataset: ServedDataset
    epoch: int
    index: int
    slot: int | None
    worker: bytes


@dataclass
class Worker:
    identity: bytes
    pid: int
    host: str
    local: bool
    capacity: int
    worker_id: int | None = None
    tasks: dict[int, Task] = field(default_factory=dict)
    # When its oldest task (the one it builds: a worker builds in order) could start: when its
    # previous task ended, or when it was given this one while idle.
    building_since: float = 0.0
    # A remote worker's tasks redone elsewhere past the task timeout, which it still holds.
    abandoned: dict[int, Task] = field(default_factory=dict)
    batches: int = 0
    busy_s: float = 0.0
    since: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"local-{self.worker_id}" if self.local else f"{self.host}:{self.pid}"

    @property
    def free(self) -> int:
        """Room for more tasks; none while it holds abandoned ones, as a new one would wait behind them."""
        return 0 if self.abandoned else self.capacity - len(self.tasks)


class Broker:
    def __init__(self, datasets: dict[str, ServedDataset], clients_sock: zmq.Socket, workers_sock: zmq.Socket,
                 pool: LocalPool, setup: dict[str, Any] | None, heartbeat_s: float = 1.0,
                 client_timeout_s: float = 60.0, remote_sock: zmq.Socket | None = None,
                 task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S) -> None:
        self.datasets = datasets
        self.csock = clients_sock
        self.wsock = workers_sock  # local workers: ipc in a private folder
        self.rsock = remote_sock   # remote workers: --worker-bind, CURVE when configured
        self.pool = pool
        # What a joining remote worker is told; None when the server takes no remote workers.
        self.setup = protocol.encode("setup", {**setup, "heartbeat_s": heartbeat_s}) if setup else None
        self.heartbeat_s = heartbeat_s
        self.client_timeout_s = client_timeout_s
        self.task_timeout_s = task_timeout_s
        self.clients: dict[bytes, Client] = {}
        self.workers: dict[bytes, Worker] = {}
        self._runnable: deque[bytes] = deque()
        self._sending: list[tuple[zmq.MessageTracker, SlotPool | None, int | None, bytes]] = []
        self._task_ids = 0
        self._next_beat = 0.0
        self._draining = False
        self._started = time.monotonic()
        self.batches_sent = 0
        self.bytes_sent = 0
        self.requeued = 0
        self.failed = 0
        self.timed_out = 0
        self.startup_s = 0.0
        # The stats as of a moment ago, for readers in other threads (the metrics exporter);
        # refreshed every `publish_s` seconds when set.
        self.published: dict | None = None
        self.publish_s: float | None = None
        self._next_publish = 0.0
        self.rejected: Counter[str] = Counter()
        # What each message is answered with, by the direction it came from. Client handlers
        # take (identity, message); worker handlers also the received array frames, which a
        # remote worker's `done` carries and the broker forwards as they are.
        self._client_handlers: dict[str, Callable[[bytes, protocol.Message], None]] = {
            "hello": self._client_hello, "request": self._client_request, "cancel": self._client_cancel,
            "ping": self._client_ping, "stats": self._client_stats, "bye": self._client_bye,
            "attach": self._client_attach, "release": self._client_release,
        }
        self._worker_handlers: dict[str, Callable[[bytes, protocol.Message, list[zmq.Frame]], None]] = {
            "join": self._worker_join, "ready": self._worker_ready, "refused": self._worker_refused,
            "heartbeat": self._worker_heartbeat, "done": self._worker_done, "failed": self._worker_failed,
        }

    def run(self, should_stop: Callable[[], bool]) -> None:
        poller = self._poller()
        short_of_slots = False
        while not should_stop():
            # ZeroMQ gives no event when it has sent a slot, so while work waits for a slot
            # poll briefly to notice the slot come free.
            short_of_slots = self._turn(poller, BUSY_POLL_MS if short_of_slots else IDLE_POLL_MS)

    def drain(self, deadline_s: float, should_abort: Callable[[], bool]) -> None:
        """After a stop signal: start nothing new, but deliver the batches workers are already
        building and let ZeroMQ finish sending them, for at most `deadline_s`. What is left is
        not lost: each client asks the restarted server again for what it still misses."""
        self._draining = True
        if not self.in_flight() and not self._sending:
            return
        log.info("draining: delivering %d batch(es) in progress, for at most %gs", self.in_flight(), deadline_s)
        sent_before = self.batches_sent
        poller = self._poller()
        end = time.monotonic() + deadline_s
        while (self.in_flight() or self._sending) and time.monotonic() < end and not should_abort():
            self._turn(poller, BUSY_POLL_MS)
        left = self.in_flight()
        log.info("drained %d batch(es)%s", self.batches_sent - sent_before,
                 f"; {left} left undelivered (their clients will ask the restarted server again)" if left else "")

    def in_flight(self) -> int:
        return sum(len(w.tasks) for w in self.workers.values())

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.csock, zmq.POLLIN)
        poller.register(self.wsock, zmq.POLLIN)
        if self.rsock is not None:
            poller.register(self.rsock, zmq.POLLIN)
        return poller

    def _turn(self, poller: zmq.Poller, timeout_ms: int) -> bool:
        """One turn of the loop: receive, supervise, send. True if work waits for a slot."""
        events = dict(poller.poll(timeout_ms))
        if self.wsock in events:
            self._receive_all(self.wsock, lambda frames: self._on_worker(LOCAL, frames))
        if self.rsock is not None and self.rsock in events:
            self._receive_all(self.rsock, lambda frames: self._on_worker(REMOTE, frames))
        if self.csock in events:
            self._receive_all(self.csock, self._on_client)
        if not self._draining:  # a worker dying while draining is noticed by its silence instead
            for worker_id, code in self.pool.reap():
                self._local_worker_died(worker_id, code)
        self._heartbeat()
        self._release_sent()
        busy = self._dispatch()
        if self.publish_s is not None and time.monotonic() >= self._next_publish:
            self._next_publish = time.monotonic() + self.publish_s
            self.published = self.stats()
        return busy

    def stop_workers(self) -> set[int]:
        """Ask every registered worker to stop; returns the pool ids of the local ones told."""
        for w in self.workers.values():
            self._send_worker(w.identity, protocol.encode("stop"))
        return {w.worker_id for w in self.workers.values() if w.local and w.worker_id is not None}

    # -- receiving -------------------------------------------------------------------------

    def _receive_all(self, sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None]) -> None:
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _on_client(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        try:
            msg = protocol.decode(frames[1:], allowed=protocol.CLIENT_TO_SERVER)
        except Exception as e:  # a validator bug must cost one message, never the server
            self.rejected[_reason(e)] += 1
            log.warning("rejected a malformed message from client %s: %s", identity.hex(), e)
            self._error(identity, "bad_message", str(e))
            return
        client = self.clients.get(identity)
        if client is not None:
            client.last_seen = time.monotonic()
            client.closed = False  # it speaks, so it is back
        self._client_handlers[msg.type](identity, msg)

    def _client_hello(self, identity: bytes, msg: protocol.Message) -> None:
        ds = self.datasets.get(msg["dataset"])
        if ds is None:
            self._error(identity, "unknown_dataset",
                        f"unknown dataset '{msg['dataset']}'; this server has: {', '.join(self.datasets)}")
            return
        self._drop_client(identity)
        plan = ds.plan_for(msg.get("shard"))
        self.clients[identity] = Client(identity, ds, plan)
        log.info("client %s joined dataset '%s' (shard %s)", identity.hex(), ds.name, msg.get("shard"))
        welcome = {"dataset": ds.name, "num_samples": plan.shard_size, "batch_size": plan.batch_size,
                   "batches": plan.num_batches, "specs": [spec.to_wire() for spec in ds.specs]}
        if ds.slots is not None:
            layout = ds.slots.layout
            welcome["shm"] = {"segment": layout.shm_name, "bytes": layout.total_bytes, "base": layout.base,
                              "slot_bytes": layout.slot_bytes, "nslots": layout.nslots,
                              "offsets": [a.offset for a in layout.arrays]}
        self._send_client(identity, protocol.encode("welcome", welcome))

    def _client_attach(self, identity: bytes, msg: protocol.Message) -> None:
        """A client that read the segment's nonce maps this very memory: lend it slots from now on.
        The nonce never crosses the network from here, so a client on another host (or in a
        container with its own /dev/shm) cannot echo it."""
        client = self._known(identity)
        if client is None:
            return
        slots = client.dataset.slots
        if slots is None or not secrets.compare_digest(msg["nonce"], slots.nonce):
            self.rejected["shm_refused"] += 1
            self._error(identity, "shm_refused",
                        f"the nonce does not match dataset '{client.dataset.name}''s shared memory: the client "
                        "mapped another segment of that name (another host's or container's)")
            return
        client.shm = True
        log.info("client %s reads '%s' from shared memory", identity.hex(), client.dataset.name)
        self._send_client(identity, protocol.encode("attached", {"max_held": self._max_held(client)}))

    def _client_release(self, identity: bytes, msg: protocol.Message) -> None:
        client = self._known(identity)
        if client is not None:
            self._take_back(client, msg["slots"])

    def _take_back(self, client: Client, pairs: list[list[int]]) -> None:
        """Slots a client has finished reading. Only a slot lent to this client, at the generation
        it was lent at, is freed; anything else (forged, stale, another client's) is refused."""
        slots = client.dataset.slots
        refused = []
        for slot, gen in pairs:
            if slots is None or client.leases.get(slot) != gen:
                refused.append([slot, gen])
                continue
            del client.leases[slot]
            self._unhold(client.identity, slots, slot)
        if refused:
            self.rejected["bad_release"] += len(refused)
            log.warning("client %s released %d slot(s) it does not hold, e.g. slot %d generation %d; refused",
                        client.identity.hex(), len(refused), *refused[0])
            self._error(client.identity, "bad_release",
                        f"slots {protocol.clip(str(refused), 200)} ([slot, generation]) are not lent to you; "
                        "release only slots you were sent, once")
        if client.closed and not client.leases:
            self._drop_client(client.identity)

    def _max_held(self, client: Client) -> int:
        """The most slots one client may hold, being built or lent: half its dataset's slots, so
        that no client, however slowly it reads, can starve another."""
        slots = client.dataset.slots
        return slots.layout.nslots // 2 if slots is not None else 0

    def _client_request(self, identity: bytes, msg: protocol.Message) -> None:
        client = self._known(identity)
        if client is None:
            return
        client.wait_s = float(msg.get("wait_s", client.wait_s))
        if msg.get("release"):
            self._take_back(client, msg["release"])
        epoch, n = msg["epoch"], client.plan.num_batches
        for index in msg["batches"]:
            key = (epoch, index)
            if index >= n:
                self._error(identity, "out_of_range",
                            f"batch {index} is out of range: an epoch of '{client.dataset.name}' has {n} batches",
                            epoch=epoch, index=index)
            elif key in client.wanted:
                continue
            elif len(client.wanted) >= protocol.MAX_CREDIT:
                self._error(identity, "credit_exceeded",
                            f"more than {protocol.MAX_CREDIT} batches outstanding; wait for some before asking for more",
                            epoch=epoch, index=index)
            else:
                client.wanted[key] = time.monotonic()
                client.pending.append(key)
        if client.pending and identity not in self._runnable:
            self._runnable.append(identity)

    def _client_cancel(self, identity: bytes, msg: protocol.Message) -> None:
        client = self._known(identity)
        if client is None:
            return
        keep = msg["keep_epoch"]
        dropped = [k for k in client.pending if k[0] != keep]
        client.pending = deque(k for k in client.pending if k[0] == keep)
        for key in dropped:
            del client.wanted[key]

    def _client_ping(self, identity: bytes, msg: protocol.Message) -> None:
        if self._known(identity) is not None:
            self._send_client(identity, protocol.encode("pong"))

    def _client_stats(self, identity: bytes, msg: protocol.Message) -> None:
        self._send_client(identity, protocol.encode("stats_reply", {"stats": self.stats()}))

    def _client_bye(self, identity: bytes, msg: protocol.Message) -> None:
        self._client_gone(identity)

    def _client_gone(self, identity: bytes) -> None:
        """A client that said bye, or whose connection is gone. One still lent slots keeps them
        until the client timeout, never less: its program may still read them (arrays stay valid
        that long after close()), and a dropped connection is no proof that the process died."""
        client = self.clients.get(identity)
        if client is not None and client.leases:
            client.closed = True
            client.pending.clear()
            client.wanted.clear()
            return
        self._drop_client(identity)

    def _known(self, identity: bytes) -> Client | None:
        client = self.clients.get(identity)
        if client is None:
            self._error(identity, "unknown_client", "this server has no session for you; send hello first")
        return client

    def _on_worker(self, via: bytes, frames: list[zmq.Frame]) -> None:
        """`via` says which socket the message came on; it prefixes the worker's identity, so a
        peer on the remote endpoint can never pass for a local worker, whatever it claims."""
        identity = via + frames[0].bytes
        try:
            msg = protocol.decode(frames[1:], allowed=protocol.WORKER_TO_BROKER)
        except Exception as e:  # a validator bug must cost one message, never the server
            self.rejected[_reason(e)] += 1
            log.error("rejected a malformed message from worker %r: %s", identity, e)
            return
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        self._worker_handlers[msg.type](identity, msg, frames[2:])

    def _registered(self, identity: bytes) -> Worker | None:
        """The worker, or None after asking it to join again: the broker restarted, or declared
        it dead while it was only slow."""
        worker = self.workers.get(identity)
        if worker is None:
            self._send_worker(identity, protocol.encode("rejoin"))
        return worker

    def _worker_join(self, identity: bytes, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        if self.setup is not None:
            self._send_worker(identity, self.setup)

    def _worker_refused(self, identity: bytes, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        log.error("a worker refused to join: %s", msg["message"])

    def _worker_heartbeat(self, identity: bytes, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        if "of" not in msg.fields:
            self._registered(identity)  # a known worker's `last_seen` is all a heartbeat updates
            return
        # From a remote worker's heartbeat connection: its batch connection may be busy sending
        # a batch for longer than the silence limit on a thin link, but the worker is alive.
        # An unknown one is left alone: its batch connection is told to rejoin.
        worker = self.workers.get(identity[:1] + msg["of"]) if identity[:1] == REMOTE else None
        if worker is not None:
            worker.last_seen = time.monotonic()

    def _worker_ready(self, identity: bytes, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        if identity in self.workers:
            return  # a repeated ready (joins queued while the server was away); its tasks stand
        local = identity[:1] == LOCAL  # where it connected decides, never what it says
        if msg.get("local") and not local:
            log.warning("a peer on the remote worker endpoint (pid %d on %s) claimed to be a local worker; "
                        "it is served as a remote one", msg["pid"], msg["host"])
        worker = Worker(identity, msg["pid"], msg["host"], local, max(1, msg.get("capacity", 2)),
                        msg.get("worker") if local else None)
        self.workers[identity] = worker
        log.info("worker %s (pid %d on %s) ready", worker.name, worker.pid, worker.host)

    def _worker_done(self, identity: bytes, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        if (ended := self._ended(identity, msg["task"])) is None:
            return
        worker, task = ended
        worker.batches += 1
        worker.busy_s += msg["busy_s"]
        task.dataset.counters.built(msg["busy_s"], msg.get("read_s", 0.0), msg.get("augment_s", 0.0))
        if task.slot is None:
            self._forward(task, msg, array_frames)
        else:
            self._deliver(task, msg["rows"])

    def _worker_failed(self, identity: bytes, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        if (ended := self._ended(identity, msg["task"])) is None:
            return
        worker, task = ended
        problem = f"worker {worker.name} failed: {msg['message']}"
        # the traceback is in the worker's own log, which for a remote worker is on another host
        log.warning("batch %d of epoch %d of '%s' failed: %s", task.index, task.epoch, task.dataset.name, problem)
        self._fail(task, problem, msg.get("traceback"))

    def _ended(self, identity: bytes, task_id: int) -> tuple[Worker, Task] | None:
        """The worker and its task that ended, which starts the clock of its next task. None for
        a task already redone: requeued when its worker was declared dead, or abandoned past the
        task timeout; its late result is dropped, so no batch is ever delivered twice."""
        worker = self._registered(identity)
        if worker is None:
            return None
        worker.building_since = time.monotonic()
        task = worker.tasks.pop(task_id, None)
        if task is None and (late := worker.abandoned.pop(task_id, None)) is not None:
            log.info("worker %s finished batch %d of epoch %d of '%s' after it was redone elsewhere; "
                     "dropped its result", worker.name, late.index, late.epoch, late.dataset.name)
        return None if task is None else (worker, task)

    # -- dispatching and delivering ----------------------------------------------------------

    def _dispatch(self) -> bool:
        """Give every free worker a task, clients taking turns. True if work waits for a slot."""
        if self._draining:
            return False
        blocked = 0
        while self._runnable and blocked < len(self._runnable):
            if not any(w.free > 0 for w in self.workers.values()):
                return False
            identity = self._runnable.popleft()
            client = self.clients.get(identity)
            if client is None or not client.pending:
                continue
            worker, slot = self._place(client)
            if worker is None:
                self._runnable.append(identity)
                blocked += 1
                continue
            blocked = 0
            epoch, index = client.pending.popleft()
            self._task_ids += 1
            task = Task(self._task_ids, identity, client.dataset, epoch, index, slot, worker.identity)
            if not worker.tasks:  # idle, it starts at once; otherwise when the one before it ends
                worker.building_since = time.monotonic()
            worker.tasks[task.id] = task
            fields = {"task": task.id, "dataset": client.dataset.name, "epoch": epoch, "index": index,
                      "shard": [client.plan.rank, client.plan.world] if client.plan.world > 1 else None}
            if slot is not None:
                fields["slot"] = slot
            self._send_worker(worker.identity, protocol.encode("task", fields))
            if client.pending:
                self._runnable.append(identity)
        return blocked > 0

    def _place(self, client: Client) -> tuple[Worker | None, int | None]:
        """The least loaded worker that can take this client's next batch, and its slot if local.

        A client may hold at most half of its dataset's slots, so it cannot starve another.
        Batches from remote workers queue in the server until ZeroMQ has sent them; a client
        may have at most RELAY_QUEUE of them beyond what remote workers are building, so one
        that stops reading pins a bounded amount of server memory, not its whole credit."""
        slots = client.dataset.slots
        relay_limit = RELAY_QUEUE + sum(w.capacity for w in self.workers.values() if not w.local)
        for worker in sorted(self.workers.values(), key=lambda w: -w.free / w.capacity):
            if worker.free <= 0:
                break
            if not worker.local:
                if client.relaying < relay_limit:
                    client.relaying += 1
                    return worker, None
                continue
            if slots is not None and client.held < self._max_held(client):
                slot = slots.acquire()
                if slot is not None:
                    client.held += 1
                    return worker, slot
        return None, None

    def _deliver(self, task: Task, rows: int) -> None:
        """Send a local worker's batch straight from its shared-memory slot."""
        slots = task.dataset.slots
        assert slots is not None and task.slot is not None
        client = self.clients.get(task.client)
        if client is None or (task.epoch, task.index) not in client.wanted:
            self._release(task)
            return
        if rows > slots.layout.batch_size:  # never send bytes past the slot
            self._fail(task, f"a worker reported batch {task.index} with {rows} rows, over the batch size "
                             f"{slots.layout.batch_size}")
            return
        if client.shm:
            self._lend(task, client, rows)
            return
        header = protocol.encode_header("batch", {"epoch": task.epoch, "index": task.index}, slots.layout.specs(rows))
        frames = slots.layout.frames(slots.buf, task.slot, rows)
        self._track(task, self._send_batch(task, header, frames), slots)

    def _lend(self, task: Task, client: Client, rows: int) -> None:
        """Tell a same-host client which slot holds its batch; the slot is its until released."""
        slots = task.dataset.slots
        assert slots is not None and task.slot is not None
        gen = slots.generation[task.slot]
        header = protocol.encode("slot", {"epoch": task.epoch, "index": task.index, "slot": task.slot,
                                          "gen": gen, "rows": rows})
        nbytes = sum(rows * a.sample_bytes for a in slots.layout.arrays)
        if self._send_batch(task, header[0], [], nbytes) is None:
            self._release(task)  # not sent: the batch is asked again, or its client is gone
        else:
            client.leases[task.slot] = gen

    def _track(self, task: Task, tracker: zmq.MessageTracker | None, slots: SlotPool | None) -> None:
        """Hold the batch's memory until ZeroMQ has let go of it (or at once if not sent)."""
        if tracker is None:
            self._release(task)
        else:
            self._sending.append((tracker, slots, task.slot, task.client))

    def _forward(self, task: Task, msg: protocol.Message, array_frames: list[zmq.Frame]) -> None:
        """Relay a remote worker's arrays, the received frames themselves, after checking them."""
        client = self.clients.get(task.client)
        if client is None or (task.epoch, task.index) not in client.wanted:
            self._release(task)
            return
        rows = msg["rows"]
        expected = [spec.batched(rows) for spec in task.dataset.specs]
        got = [protocol.ArraySpec.of(name, a) for name, a in msg.arrays.items()]
        if got != expected or rows > task.dataset.plan.batch_size:
            problem = f"a worker sent batch {task.index} as {got}, but this dataset's batches are {expected}"
            log.error("%s (does that worker run another npyloader version or augment code?)", problem)
            self._fail(task, problem)
            return
        header = protocol.encode_header("batch", {"epoch": task.epoch, "index": task.index}, expected)
        # Received frames carry no tracker; new Frames over the same buffers do, without a copy.
        tracked = [zmq.Frame(f.buffer, track=True, copy=False) for f in array_frames]
        self._track(task, self._send_batch(task, header, tracked), None)

    def _send_batch(self, task: Task, header: bytes, frames: list,
                    nbytes: int | None = None) -> zmq.MessageTracker | None:
        """Send a batch; its tracker (a done one for a lent slot, which has no frames to track),
        or None when the send failed. `nbytes` counts a lent slot's bytes, which travel in no frame."""
        client = self.clients[task.client]
        try:
            if frames:
                tracker = self.csock.send_multipart([task.client, header, *frames], flags=zmq.NOBLOCK,
                                                    copy=False, track=True)
            else:
                self.csock.send_multipart([task.client, header], flags=zmq.NOBLOCK)
                tracker = _SENT
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                log.info("client %s is gone; dropping its session", task.client.hex())
                self._client_gone(task.client)
            else:
                client.pending.appendleft((task.epoch, task.index))
                self._mark_runnable(task.client)
            return None
        asked = client.wanted.get((task.epoch, task.index))
        self._finish(task)
        if nbytes is None:
            nbytes = sum(len(f) for f in frames)
        task.dataset.counters.served(nbytes, None if asked is None else time.monotonic() - asked)
        client.batches += 1
        client.bytes += nbytes
        self.batches_sent += 1
        self.bytes_sent += nbytes
        return tracker

    def _finish(self, task: Task) -> None:
        client = self.clients.get(task.client)
        if client is not None:
            client.wanted.pop((task.epoch, task.index), None)
            client.crashes.pop((task.epoch, task.index), None)

    def _release_sent(self) -> None:
        if not self._sending:
            return
        still = []
        for item in self._sending:
            tracker, slots, slot, identity = item
            if tracker.done:
                self._unhold(identity, slots, slot)
            else:
                still.append(item)
        self._sending = still

    def _release(self, task: Task) -> None:
        self._unhold(task.client, task.dataset.slots if task.slot is not None else None, task.slot)

    def _unhold(self, identity: bytes, slots: SlotPool | None, slot: int | None) -> None:
        """A batch no longer occupies server memory: free its slot (local worker) or its place
        in the client's relay queue (remote worker)."""
        client = self.clients.get(identity)
        if slots is not None and slot is not None:
            slots.release(slot)
            if client is not None:
                client.held = max(0, client.held - 1)
        elif client is not None:
            client.relaying = max(0, client.relaying - 1)

    # -- worker liveness -------------------------------------------------------------------

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + self.heartbeat_s
        self._forget_silent_clients(now)
        beat = protocol.encode("heartbeat")
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if silent > SILENCE_BEATS * self.heartbeat_s:
                self._kill(worker)
                self._remove_worker(worker, f"went silent for {silent:.1f}s")
            elif worker.tasks and now - worker.building_since > self.task_timeout_s:
                self._time_out(worker, now - worker.building_since)
            else:
                self._send_worker(worker.identity, beat)

    def _kill(self, worker: Worker) -> None:
        """SIGKILL a hung local worker before its batches are redone, so that it cannot write
        into a slot once that is reused; the pool then starts a replacement."""
        if worker.local and worker.worker_id is not None:
            self.pool.kill(worker.worker_id)

    def _time_out(self, worker: Worker, elapsed: float) -> None:
        """A worker still building one batch past --task-timeout: hung in an op that lets its
        heartbeats through. A local one is killed and its batches redone, as a dead worker's. A
        remote one cannot be killed from here (its `npyloader worker` kills it past its own
        timeout): its batches are redone elsewhere and it is given nothing more until it has
        finished them, so that no new batch waits behind the hung one."""
        building = worker.tasks[min(worker.tasks)]
        why = (f"timed out: still building batch {building.index} of epoch {building.epoch} of "
               f"'{building.dataset.name}' after {elapsed:.1f}s (--task-timeout {self.task_timeout_s:g}s)")
        self.timed_out += 1
        if worker.local:
            self._kill(worker)
            self._remove_worker(worker, why, hung=True)
        else:
            worker.abandoned.update(worker.tasks)
            self._requeue(worker, why, hung=True)

    def _forget_silent_clients(self, now: float) -> None:
        """A client waiting for batches pings every second, so one silent this long has vanished.
        If it was only idle, its next request is answered `unknown_client` and it says hello again."""
        for client in [c for c in self.clients.values() if now - c.last_seen > self.client_timeout_s]:
            log.info("client %s silent for %.0fs; forgetting it", client.identity.hex(), now - client.last_seen)
            self._drop_client(client.identity)

    def _local_worker_died(self, worker_id: int, code: int | None) -> None:
        worker = next((w for w in self.workers.values() if w.local and w.worker_id == worker_id), None)
        if worker is not None:
            self._remove_worker(worker, _exit_reason(code))

    def _remove_worker(self, worker: Worker, why: str, hung: bool = False) -> None:
        self.workers.pop(worker.identity, None)
        self._requeue(worker, why, hung)

    def _requeue(self, worker: Worker, why: str, hung: bool = False) -> None:
        """Put a lost worker's batches back at the front of their queues. The oldest is the one
        it was building (a worker builds in order), and the only one its loss counts against;
        `hung` says the worker timed out rather than died."""
        building = min(worker.tasks, default=None)
        for task in sorted(worker.tasks.values(), key=lambda t: -t.id):
            self._redo(task, f"worker {worker.name} {why}" if task.id == building else None, hung)
        log.warning("worker %s (pid %d on %s) %s; redoing its %d batch(es)",
                    worker.name, worker.pid, worker.host, why, len(worker.tasks))
        worker.tasks.clear()

    def _redo(self, task: Task, lost: str | None, hung: bool) -> None:
        """Put one batch back at the front of its client's queue. `lost` says how the worker
        building it was lost; a batch lost that way by MAX_BATCH_CRASHES workers in a row is
        failed instead, rather than killing workers forever."""
        client = self.clients.get(task.client)
        key = (task.epoch, task.index)
        if client is None or key not in client.wanted:
            self._release(task)
            return
        if lost is not None:
            client.crashes[key] += 1
            if client.crashes[key] >= MAX_BATCH_CRASHES:
                self._give_up(task, client, lost, hung)
                return
        self._release(task)
        client.pending.appendleft(key)
        self._mark_runnable(task.client)
        self.requeued += 1

    def _give_up(self, task: Task, client: Client, last: str, hung: bool) -> None:
        """Fail a batch that keeps losing its workers, naming its files, and what to change:
        a crash points at the data or an op; a timeout at a hang, or at --task-timeout."""
        samples = client.plan.batch(task.epoch, task.index)
        files = task.dataset.index.files_of(samples)
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        where = f"batch {task.index} of epoch {task.epoch} of '{task.dataset.name}'"
        if hung:
            problem = (f"{where} was lost by {MAX_BATCH_CRASHES} workers in a row (last: {last}); a read or an "
                       f"augment op may hang on a sample in it, or it takes longer than that to build: if it is "
                       f"only slow, raise --task-timeout (of `npyloader serve`, and of `npyloader worker` for "
                       f"remote workers). Its files: {shown}")
        else:
            problem = (f"{where} took down {MAX_BATCH_CRASHES} workers in a row (last: {last}); a sample in it "
                       f"may crash the reader or an augment op, or its file may be unreadable: {shown}")
        log.error("%s; failing it instead of retrying", problem)
        self._fail(task, problem)

    def _fail(self, task: Task, problem: str, traceback: str | None = None) -> None:
        """The batch will not be sent: free what it holds and tell its client why (with the
        worker's traceback when a worker raised)."""
        self._release(task)
        self.failed += 1
        self._finish(task)
        self._error(task.client, "batch_failed", problem, traceback, epoch=task.epoch, index=task.index)

    def _mark_runnable(self, identity: bytes) -> None:
        if identity not in self._runnable:
            self._runnable.appendleft(identity)

    def _drop_client(self, identity: bytes) -> None:
        """Forget a client, and take back the slots lent to it: it has left, or been silent for
        the client timeout, so nothing of it still reads them."""
        client = self.clients.pop(identity, None)
        if client is None:
            return
        slots = client.dataset.slots
        if client.leases and slots is not None:
            log.info("client %s left holding %d slot(s); reclaiming them", identity.hex(), len(client.leases))
            for slot in client.leases:
                slots.release(slot)
        log.info("client %s left", identity.hex())

    # -- sending ---------------------------------------------------------------------------

    def _send_client(self, identity: bytes, frames: list) -> None:
        try:
            self.csock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                self._client_gone(identity)
            else:
                log.warning("could not reply to client %s: %s", identity.hex(), e)

    def _send_worker(self, identity: bytes, frames: list) -> None:
        sock = self.wsock if identity[:1] == LOCAL else self.rsock
        try:
            sock.send_multipart([identity[1:], *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not reach worker %r: %s", identity, e)

    def _error(self, identity: bytes, code: str, message: str, traceback: str | None = None, **where: int) -> None:
        fields: dict[str, Any] = {"code": code, "message": protocol.clip(message), **where}
        if traceback:
            fields["traceback"] = protocol.clip(traceback, tail=True)
        self._send_client(identity, protocol.encode("error", fields))

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Everything `npyloader stats` shows and Prometheus scrapes, as plain values."""
        now = time.monotonic()
        return {
            "uptime_s": round(now - self._started, 3),
            "startup_s": round(self.startup_s, 3),
            "datasets": {name: self._dataset_stats(ds) for name, ds in self.datasets.items()},
            "workers": {
                "alive": self.pool.alive() + sum(not w.local for w in self.workers.values()),
                "ready": len(self.workers), "respawns": self.pool.respawns, "requeued_batches": self.requeued,
                "timed_out_batches": self.timed_out,
                "list": [_worker_stats(w, now) for w in self.workers.values()],
            },
            "clients": [{"id": c.identity.hex(), "dataset": c.dataset.name, "batches": c.batches,
                         "transport": "shm" if c.shm else "socket", "slots_held": len(c.leases),
                         "bytes": c.bytes, "wait_s": round(c.wait_s, 3), "pending": len(c.pending),
                         "outstanding": len(c.wanted), "connected_s": round(now - c.since, 3)}
                        for c in self.clients.values()],
            "batches_served": self.batches_sent,
            "bytes_served": self.bytes_sent,
            "failed_batches": self.failed,
            "rejected": dict(self.rejected),
        }

    def _dataset_stats(self, ds: ServedDataset) -> dict[str, Any]:
        mine = [c for c in self.clients.values() if c.dataset is ds]
        return {"samples": ds.plan.num_samples, "batches": ds.plan.num_batches, "batch_size": ds.plan.batch_size,
                "free_slots": ds.slots.free if ds.slots is not None else 0,
                "queued": sum(len(c.pending) for c in mine), "outstanding": sum(len(c.wanted) for c in mine),
                "index_s": round(ds.index_s, 3), **ds.counters.snapshot()}


def _worker_stats(w: Worker, now: float) -> dict[str, Any]:
    up = max(now - w.since, 1e-9)
    return {"id": w.name, "pid": w.pid, "host": w.host, "local": w.local, "batches": w.batches,
            "busy_s": round(w.busy_s, 3), "tasks": len(w.tasks), "batches_per_s": round(w.batches / up, 2),
            "busy_pct": round(min(100.0, 100 * w.busy_s / up), 1), "last_heartbeat_s": round(now - w.last_seen, 3)}


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def _reason(e: Exception) -> str:
    if not isinstance(e, protocol.ProtocolError):
        return "validator_error"
    text = str(e)
    for key in ("msgpack", "version", "unknown message type", "lacks field", "invalid", "frames", "extension", "limit"):
        if key in text:
            return key.replace(" ", "_")
    return "other"
