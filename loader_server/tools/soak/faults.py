"""The faults a soak injects, one at a time: what each does, and what it checks on the way.

Each fault acts on the running cluster with the soak's seeded generator (which process, how
long, which bytes) and returns what it did, plus the pid, if any, that the server must stop
listing among its workers before the system counts as recovered. A fault that catches the
system misbehaving while it is being injected (a server that does not stop on SIGTERM, a
stopped worker the server never replaces, a malformed message left unanswered, a worker that
outlives its parent) raises FaultFailed.
"""

from __future__ import annotations

import pickle
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zmq

from loader_client import protocol
from loader_server.serve.broker import SILENCE_BEATS
from loader_server.tools.soak import hang_op
from loader_server.tools.soak.cluster import Cluster, tail
from loader_server.tools.soak.procs import ProcRef, children

TARGET_TIMEOUT_S = 60.0
ORPHAN_EXIT_S = 15.0
REPLY_TIMEOUT_S = 10.0
PARTITION_S = 10.0  # how long remote_partition cuts the remote worker's link


class FaultFailed(RuntimeError):
    """The system misbehaved while a fault was injected; the message says how."""


@dataclass(frozen=True)
class Injected:
    detail: str
    gone_pid: int | None = None


@dataclass(frozen=True)
class Fault:
    kind: str
    summary: str
    inject: Callable[[Cluster, random.Random], Injected]
    needs_link: bool = False  # only where the remote worker's link is a real one (soak/network.py)


def _target(cluster: Cluster, rng: random.Random, find: Callable[[], list[ProcRef]], what: str) -> ProcRef:
    """A random live process among `find()`, waiting for one (a replacement may be starting)."""
    found = cluster.wait_for(find, TARGET_TIMEOUT_S)
    if not found:
        raise FaultFailed(f"no {what} was running within {TARGET_TIMEOUT_S:g}s to inject the fault into")
    return rng.choice(sorted(found, key=lambda p: p.pid))


def _stop_seconds(cluster: Cluster, rng: random.Random) -> float:
    """Longer than the silence after which the server gives a worker up, with a margin."""
    return rng.uniform(2.0, 3.0) * SILENCE_BEATS * cluster.cfg.heartbeat_s


def _listed_pids(cluster: Cluster) -> set[int] | None:
    stats = cluster.stats()
    return None if stats is None else {w["pid"] for w in stats["workers"]["list"]}


def _await_exit(cluster: Cluster, procs: list[ProcRef], why: str) -> None:
    if not cluster.wait_for(lambda: not any(p.alive() for p in procs), ORPHAN_EXIT_S):
        alive = [p.pid for p in procs if p.alive()]
        raise FaultFailed(f"process(es) {alive} still ran {ORPHAN_EXIT_S:g}s after {why}")


def local_kill(cluster: Cluster, rng: random.Random) -> Injected:
    victim = _target(cluster, rng, cluster.local_workers, "local worker")
    victim.signal(signal.SIGKILL)
    return Injected(f"SIGKILL local worker pid {victim.pid}", victim.pid)


def local_stop(cluster: Cluster, rng: random.Random) -> Injected:
    victim = _target(cluster, rng, cluster.local_workers, "local worker")
    seconds = _stop_seconds(cluster, rng)
    victim.signal(signal.SIGSTOP)
    killed = cluster.wait_for(lambda: not victim.alive(), seconds)
    victim.signal(signal.SIGCONT)
    if not killed:
        raise FaultFailed(f"local worker pid {victim.pid}, stopped for {seconds:.1f}s, was not killed by the server "
                          "(a stopped worker must be replaced before its slots are reused)")
    return Injected(f"SIGSTOP local worker pid {victim.pid}; the server killed it after it was silent", victim.pid)


def remote_kill(cluster: Cluster, rng: random.Random) -> Injected:
    victim = _target(cluster, rng, cluster.remote_workers, "remote worker process")
    victim.signal(signal.SIGKILL)
    return Injected(f"SIGKILL remote worker process pid {victim.pid}; its supervisor restarts it", victim.pid)


def remote_stop(cluster: Cluster, rng: random.Random) -> Injected:
    victim = _target(cluster, rng, cluster.remote_workers, "remote worker process")
    seconds = _stop_seconds(cluster, rng)
    started = time.monotonic()
    victim.signal(signal.SIGSTOP)
    forgotten = cluster.wait_for(lambda: victim.pid not in (_listed_pids(cluster) or {victim.pid}), seconds)
    cluster.pause(seconds - (time.monotonic() - started))
    victim.signal(signal.SIGCONT)
    if not forgotten:
        raise FaultFailed(f"the server still listed remote worker pid {victim.pid} after it was stopped "
                          f"for {seconds:.1f}s")
    return Injected(f"SIGSTOP remote worker pid {victim.pid} for {seconds:.1f}s (the server gave it up), "
                    "then SIGCONT: it rejoins")


def remote_restart(cluster: Cluster, rng: random.Random) -> Injected:
    assert cluster.remote is not None
    old, workers = cluster.remote.pid, cluster.remote_workers()
    cluster.remote.kill()
    cluster.remote.wait(10)
    _await_exit(cluster, workers, f"their `npyloader worker` (pid {old}) was killed")
    down = rng.uniform(0.0, 2.0)
    cluster.pause(down)
    cluster.start_remote()
    return Injected(f"SIGKILL `npyloader worker` pid {old} (its worker {[w.pid for w in workers]} exited by "
                    f"itself), started again after {down:.1f}s", workers[0].pid if workers else None)


def _restart_server(cluster: Cluster, rng: random.Random, what: str) -> str:
    down = rng.uniform(0.0, 2.0)
    cluster.pause(down)
    took = cluster.start_server()
    return f"{what}; restarted on the same ports after {down:.1f}s, ready in {took:.1f}s"


def server_kill(cluster: Cluster, rng: random.Random) -> Injected:
    assert cluster.server is not None
    old, workers = cluster.server.pid, cluster.local_workers()
    cluster.server.kill()
    cluster.server.wait(10)
    _await_exit(cluster, workers, f"their server (pid {old}) was killed")
    return Injected(_restart_server(cluster, rng, f"SIGKILL server pid {old}"))


def server_term(cluster: Cluster, rng: random.Random) -> Injected:
    assert cluster.server is not None
    old, workers = cluster.server.pid, cluster.local_workers()
    code, seconds = cluster.stop_server(signal.SIGTERM)
    if code is None:
        raise FaultFailed(f"the server (pid {old}) did not stop within {seconds:.0f}s of SIGTERM and was killed")
    if code != 0:
        raise FaultFailed(f"the server (pid {old}) exited with status {code} on SIGTERM: {tail(cluster.server_log, 5)}")
    _await_exit(cluster, workers, f"their server (pid {old}) stopped")
    return Injected(_restart_server(cluster, rng, f"SIGTERM server pid {old}: exit 0 after {seconds:.1f}s"))


def client_vanish(cluster: Cluster, rng: random.Random) -> Injected:
    proc, result = cluster.start_vanisher(first_epoch=rng.randrange(1_000, 1_000_000))
    got = cluster.wait_for(lambda: b'"got"' in _read(result) or proc.poll() is not None, TARGET_TIMEOUT_S)
    proc.kill()
    proc.wait(10)
    if not got or b'"got"' not in _read(result):
        raise FaultFailed(f"the vanishing client (pid {proc.pid}) never received its first batches")
    return Injected(f"client pid {proc.pid} asked for {cluster.cfg.prefetch} batches, took 2, was SIGKILLed")


def hung_op(cluster: Cluster, rng: random.Random) -> Injected:
    """Arm the soak's hang op for one worker process of the server (local) or of `npyloader
    worker` (remote); the one that claims it must be killed past --task-timeout (by the server,
    or by its own supervisor) and replaced."""
    remote = rng.random() < 0.5
    how = rng.choice(hang_op.HOWS)
    parent = cluster.remote if remote else cluster.server
    assert parent is not None
    where = "remote" if remote else "local"
    folder = cluster.hang_folder
    trigger = hang_op.trigger(folder, parent.pid, how)
    trigger.touch()
    took = cluster.wait_for(lambda: hang_op.claimed(folder), TARGET_TIMEOUT_S)
    if not took:
        try:
            trigger.unlink()
        except FileNotFoundError:  # claimed just now
            took = hang_op.claimed(folder)
    if not took:
        raise FaultFailed(f"no {where} worker process (of pid {parent.pid}) ran the soak's hang op within "
                          f"{TARGET_TIMEOUT_S:g}s of it being armed")
    pid = int(took[0].name.removeprefix("hung-"))
    for path in took:
        path.unlink()
    victim = next((p for p in children(parent.pid) if p.pid == pid), None)
    limit = cluster.cfg.task_timeout_s
    deadline = 2 * limit + SILENCE_BEATS * cluster.cfg.heartbeat_s + 10
    hung_at = time.monotonic()
    if victim is not None and not cluster.wait_for(lambda: not victim.alive(), deadline):
        raise FaultFailed(f"{where} worker pid {pid}, hung ({how}) in an augment op, still ran {deadline:.0f}s "
                          f"later (--task-timeout {limit:g}s)")
    return Injected(f"{where} worker pid {pid} hung in an augment op ({'time.sleep' if how == 'sleep' else 'a Python loop'}"
                    f"); killed {time.monotonic() - hung_at:.1f}s after the soak saw it hang "
                    f"(--task-timeout {limit:g}s)", pid)


def _remote_listed(cluster: Cluster) -> list[dict] | None:
    stats = cluster.stats()
    return None if stats is None else [w for w in stats["workers"]["list"] if not w["local"]]


def remote_loss(cluster: Cluster, rng: random.Random) -> Injected:
    link, port = cluster.net.link, cluster.worker_port
    assert link is not None
    seconds = rng.uniform(5.0, 15.0)
    before = sum(w["batches"] for w in _remote_listed(cluster) or [])
    link.loss(0.05, port=port)
    try:
        cluster.pause(seconds)
        during = sum(w["batches"] for w in _remote_listed(cluster) or [])
    finally:
        link.heal()
    return Injected(f"5% packet loss each way on the worker port {port} for {seconds:.1f}s, then healed; the remote "
                    f"worker built {max(0, during - before)} batches meanwhile")


def _none_of(cluster: Cluster, pids: set[int]) -> bool:
    """The server answers and lists none of these remote workers."""
    listed = _remote_listed(cluster)
    return listed is not None and not {w["pid"] for w in listed} & pids


def remote_partition(cluster: Cluster, rng: random.Random) -> Injected:
    link, port = cluster.net.link, cluster.worker_port
    assert link is not None
    listed = {w["pid"] for w in _remote_listed(cluster) or []}
    started = time.monotonic()
    link.partition(port=port)
    try:
        given_up = cluster.wait_for(lambda: _none_of(cluster, listed) and time.monotonic(), PARTITION_S)
        cluster.pause(PARTITION_S - (time.monotonic() - started))
    finally:
        link.heal()
    if not given_up:
        raise FaultFailed(f"the server still listed remote worker(s) {sorted(listed)} after its link was cut for "
                          f"{PARTITION_S:g}s")
    healed = time.monotonic()
    back = cluster.wait_for(lambda: any(w["batches"] > 0 for w in _remote_listed(cluster) or []), TARGET_TIMEOUT_S)
    if not back:
        raise FaultFailed(f"the remote worker did not rejoin and build a batch within {TARGET_TIMEOUT_S:g}s of its "
                          f"link being healed: the server reports {cluster.stats()}")
    return Injected(f"worker port {port} cut for {PARTITION_S:g}s (the server gave the remote worker up after "
                    f"{given_up - started:.1f}s); healed, it rejoined and built batches "
                    f"{time.monotonic() - healed:.1f}s later")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


class _OpensMarker:
    """Unpickling this creates a file: proof, if the file appears, that bytes reached pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def malformed_messages(rng: random.Random, marker: Path) -> list[list[bytes]]:
    """Random bytes, an object array as msgpack-numpy encodes it (its data a pickle), the same
    inside a request, an unknown message type and a foreign protocol version."""
    bomb = np.empty(1, dtype=object)
    bomb[0] = _OpensMarker(str(marker))
    as_msgpack_numpy = {b"nd": True, b"type": [["", "|O"]], b"kind": b"O", b"shape": [1], b"data": pickle.dumps(bomb)}
    messages = [[rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 4))] for _ in range(4)]
    messages += [
        [msgpack.packb(as_msgpack_numpy)],
        [msgpack.packb({"v": protocol.VERSION, "type": "request", "epoch": 0, "batches": as_msgpack_numpy})],
        [msgpack.packb({"v": protocol.VERSION, "type": "format_disk", "path": "/"})],
        [msgpack.packb({"v": protocol.VERSION + 1, "type": "hello", "dataset": "train"})],
    ]
    return messages


def malformed(cluster: Cluster, rng: random.Random) -> Injected:
    marker = cluster.root / "pickle-reached"
    messages = malformed_messages(rng, marker)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    answers: list[str] = []
    try:
        sock.connect(cluster.url)
        for frames in messages:
            sock.send_multipart(frames)

        def collect() -> bool:
            while sock.poll(0):
                try:
                    msg = protocol.decode(sock.recv_multipart(), allowed=protocol.SERVER_TO_CLIENT)
                except protocol.ProtocolError as e:
                    answers.append(f"undecodable answer: {e}")
                else:
                    answers.append(msg["code"] if msg.type == "error" else f"a '{msg.type}' where an error was due")
            return len(answers) >= len(messages)

        cluster.wait_for(collect, REPLY_TIMEOUT_S)
    finally:
        sock.close(0)
    if marker.exists():
        raise FaultFailed("a pickle payload sent to the server was unpickled (its marker file appeared)")
    if answers.count("bad_message") != len(messages):
        raise FaultFailed(f"{len(messages)} malformed messages got {len(answers)} answers ({answers}); "
                          "every one should get a bad_message error")
    return Injected(f"{len(messages)} malformed messages, each answered bad_message; nothing unpickled")


FAULTS = (
    Fault("local_kill", "SIGKILL a local worker; the server's pool restarts it and its batches are redone",
          local_kill),
    Fault("local_stop", "SIGSTOP a local worker past 3 heartbeats (then SIGCONT); the server must kill and "
          "replace it before reusing its slots", local_stop),
    Fault("remote_kill", "SIGKILL the remote worker process; its `npyloader worker` supervisor restarts it",
          remote_kill),
    Fault("remote_stop", "SIGSTOP the remote worker process past 3 heartbeats, then SIGCONT; the server gives it "
          "up, then it rejoins", remote_stop),
    Fault("remote_restart", "SIGKILL the whole `npyloader worker` and start it again", remote_restart),
    Fault("server_kill", "SIGKILL the server and restart it on the same ports; clients resume", server_kill),
    Fault("server_term", "SIGTERM the server (it must exit 0) and restart it on the same ports", server_term),
    Fault("client_vanish", "a third client asks for 8 batches, takes 2 and is SIGKILLed mid-epoch; the server "
          "must forget it", client_vanish),
    Fault("malformed", "a burst of malformed messages on a raw DEALER: random bytes, a msgpack-numpy pickled "
          "object array (alone and as a field), an unknown type, a foreign version", malformed),
    Fault("hung_op", "the soak's augment op hangs in one worker process, local or remote, in C (time.sleep) or "
          "in a Python loop, heartbeats still flowing; it must be killed past --task-timeout and replaced",
          hung_op),
    Fault("remote_loss", "5% packet loss each way on the remote worker's link to the worker port for 5-15 s, "
          "then healed", remote_loss, needs_link=True),
    Fault("remote_partition", "the remote worker's link to the worker port cut for 10 s (the server must give it "
          "up), then healed: it must rejoin and build batches", remote_partition, needs_link=True),
)
