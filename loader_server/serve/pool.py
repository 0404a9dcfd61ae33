"""Local worker pool supervision: start N worker processes, notice deaths, respawn, stop cleanly.

Workers are started with the `spawn` method, never `fork`: the server holds ZeroMQ sockets
and threads, which a forked child must not inherit. The broker asks `reap()` on every turn of
its loop; a dead worker (even one killed with SIGKILL) is reported so its batches can be
redone, and a fresh process takes its place.

A spawned process spends about half a second starting Python and importing numpy, zmq and
the worker's modules before it can do anything, so the server's pool starts its processes
before their specs exist (the indexes, still being built): each waits on a pipe, and
`provide()` sends the specs when they are ready. Such a spec is pickled at once (a spec that
cannot be is an error there, not a silent hang) and written from a short-lived thread, so
neither the server's start nor the broker's loop (respawns) waits for a child's imports. A pool
given its `make_spec` up front passes specs as spawn arguments instead, so they may hold what
only inheritance can share (the remote workers' shared counters).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

from loader_server.worker.loop import run_worker

log = logging.getLogger(__name__)

RESPAWN_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)
# A worker that lived this long died of something new, not of what killed its predecessors:
# its replacement starts at once again.
HEALTHY_AFTER_S = 60.0


@dataclass
class _Child:
    process: BaseProcess
    deaths: int = 0
    restart_at: float = 0.0
    started: float = field(default_factory=time.monotonic)
    spec_pipe: Connection | None = None  # a deferred spec's pipe, until the spec is on its way


def _await_spec(target: Callable[[Any], None], spec_pipe: Connection) -> None:
    """Every pool process's entry point. By now spawn has imported `target`'s module (the slow
    part of a start); the spec follows on the pipe, or never, if the pool stops first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops its workers itself
    try:
        spec = spec_pipe.recv()
    except EOFError:
        return
    finally:
        spec_pipe.close()
    target(spec)


def _send_spec(spec_pipe: Connection, pickled: memoryview) -> None:
    try:
        spec_pipe.send_bytes(pickled)
    except OSError:
        pass  # the child died first; reap() reports it
    finally:
        spec_pipe.close()


class LocalPool:
    """N worker processes; worker ids grow with every respawn so stale messages are recognisable.

    `make_spec(worker_id)` builds the one argument of `target`, the child's entry point. Given
    None, the processes start at once and wait for `provide(make_spec)`.
    """

    def __init__(self, make_spec: Callable[[int], Any] | None, size: int,
                 target: Callable[[Any], None] = run_worker) -> None:
        self._ctx = mp.get_context("spawn")
        self._make_spec = make_spec
        self._deferred = make_spec is None
        self._target = target
        self._children: dict[int, _Child] = {}
        self._next_id = 0
        self.respawns = 0
        for _ in range(size):
            self._start(deaths=0)

    def provide(self, make_spec: Callable[[int], Any]) -> None:
        """Send the waiting processes their specs; respawned ones get theirs as they start."""
        assert self._deferred and self._make_spec is None, "provide() is for a pool started without specs, once"
        self._make_spec = make_spec
        for worker_id, child in self._children.items():
            self._send(worker_id, child)

    def _start(self, deaths: int) -> int:
        worker_id = self._next_id
        self._next_id += 1
        if self._deferred:
            receiver, sender = self._ctx.Pipe(duplex=False)
            target, args = _await_spec, (self._target, receiver)
        else:
            assert self._make_spec is not None
            target, args = self._target, (self._make_spec(worker_id),)
        proc = self._ctx.Process(target=target, args=args, name=f"npyloader-worker-{worker_id}", daemon=True)
        proc.start()
        child = self._children[worker_id] = _Child(proc, deaths)
        if self._deferred:
            receiver.close()
            child.spec_pipe = sender
            self._send(worker_id, child)
        return worker_id

    def _send(self, worker_id: int, child: _Child) -> None:
        if self._make_spec is None or child.spec_pipe is None:
            return
        pickled = ForkingPickler.dumps(self._make_spec(worker_id))
        pipe, child.spec_pipe = child.spec_pipe, None
        threading.Thread(target=_send_spec, args=(pipe, pickled), name=f"npyloader-spec-{worker_id}",
                         daemon=True).start()

    def alive(self) -> int:
        return sum(not c.restart_at and c.process.is_alive() for c in self._children.values())

    def kill(self, worker_id: int) -> None:
        """SIGKILL a hung worker; `reap` then reports it and starts a replacement."""
        child = self._children.get(worker_id)
        if child is not None and not child.restart_at and child.process.is_alive():
            child.process.kill()

    def reap(self) -> list[tuple[int, int | None]]:
        """(id, exit code) of workers that died since the last call; each is replaced after a
        short backoff."""
        dead = []
        now = time.monotonic()
        for wid, child in list(self._children.items()):
            if child.restart_at or child.process.is_alive():  # a closed process must not be asked
                continue
            code = child.process.exitcode
            log.warning("worker %d (pid %s) exited with code %s; restarting it", wid, child.process.pid, code)
            child.process.close()
            if child.spec_pipe is not None:
                child.spec_pipe.close()
                child.spec_pipe = None
            if now - child.started >= HEALTHY_AFTER_S:
                child.deaths = 0
            child.restart_at = now + RESPAWN_BACKOFF_S[min(child.deaths, len(RESPAWN_BACKOFF_S) - 1)]
            dead.append((wid, code))
        for wid, child in list(self._children.items()):
            if child.restart_at and child.restart_at <= now:
                del self._children[wid]
                self._start(deaths=child.deaths + 1)
                self.respawns += 1
        return dead

    def stop(self, deadline_s: float = 5.0, told: set[int] | None = None) -> None:
        """Wait up to `deadline_s` for the workers that were asked to stop over the socket
        (`told`, default all), then terminate, then kill. A worker never told (one still
        starting, which had not yet said ready) is terminated at once instead of waited for."""
        for child in self._children.values():
            if child.spec_pipe is not None:  # never given a spec: it exits as the pipe closes
                child.spec_pipe.close()
                child.spec_pipe = None
        end = time.monotonic() + deadline_s
        for wid, child in self._children.items():
            if child.restart_at or (told is not None and wid not in told):
                continue
            child.process.join(max(0.0, end - time.monotonic()))
        for sig_name in ("terminate", "kill"):
            for child in self._children.values():
                if not child.restart_at and child.process.is_alive():
                    getattr(child.process, sig_name)()
                    child.process.join(1.0)
        for child in self._children.values():
            if not child.restart_at:
                child.process.close()
        self._children.clear()
