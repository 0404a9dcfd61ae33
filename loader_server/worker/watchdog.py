"""How long each `npyloader worker` process has been building its current batch, and the kill
of one past --task-timeout.

A process whose augment op hangs (in C, or looping in Python) keeps heartbeating, since its
socket thread is fine, and the server cannot kill a process on another host. So the
`npyloader worker` supervisor watches its own processes: each one's compute thread stamps the
start of every batch into a few doubles shared with the supervisor, which kills a process whose
stamp is older than the timeout; the pool then starts a new one, and the server, hearing no
more from the old one, redoes its batches. The doubles take no lock: a process killed while
holding one would leave its supervisor blocked for good.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import BaseContext

from loader_client import protocol
from loader_server.metrics import SharedCounters

log = logging.getLogger(__name__)

START, PID, TASK, EPOCH, INDEX = range(5)


@dataclass(frozen=True)
class Overdue:
    """A batch past the timeout, as its process last stamped it."""

    elapsed_s: float
    pid: int
    task: int
    epoch: int
    index: int


class TaskClock:
    """One worker process's current batch: when it started (0 while idle), and which it is.
    The start is written last and cleared first; it is one aligned double, so a reader never
    sees half of it, and the batch it names is only ever used in a log line."""

    def __init__(self, ctx: BaseContext) -> None:
        self._stamp = ctx.RawArray("d", 5)

    def start(self, msg: protocol.Message) -> None:
        stamp = self._stamp
        stamp[PID], stamp[TASK], stamp[EPOCH], stamp[INDEX] = os.getpid(), msg["task"], msg["epoch"], msg["index"]
        stamp[START] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host

    def stop(self) -> None:
        self._stamp[START] = 0.0

    def overdue(self, limit_s: float) -> Overdue | None:
        started = self._stamp[START]
        elapsed = time.monotonic() - started
        if not started or elapsed <= limit_s:
            return None
        pid, task, epoch, index = (int(v) for v in self._stamp[PID:])
        return Overdue(elapsed, pid, task, epoch, index)


def timed(runner: Callable[[protocol.Message], list], clock: TaskClock) -> Callable[[protocol.Message], list]:
    """`runner`, stamping `clock` for as long as each batch takes."""
    def run(msg: protocol.Message) -> list:
        clock.start(msg)
        try:
            return runner(msg)
        finally:
            clock.stop()

    return run


class Watchdog:
    """The supervisor's side: a clock for each worker process it starts, and the kill of one
    still building a batch after `limit_s`."""

    def __init__(self, ctx: BaseContext, limit_s: float, counters: SharedCounters | None = None) -> None:
        self._ctx = ctx
        self.limit_s = limit_s
        self._counters = counters
        self._clocks: dict[int, TaskClock] = {}

    def clock_for(self, worker_id: int) -> TaskClock:
        """A new process's clock, made before it starts, so that it can travel with its spec."""
        clock = self._clocks[worker_id] = TaskClock(self._ctx)
        return clock

    def forget(self, worker_id: int) -> None:
        self._clocks.pop(worker_id, None)

    def check(self, kill: Callable[[int], None]) -> None:
        """Kill every process past the limit; each is killed once, its clock stopped here."""
        for worker_id, clock in self._clocks.items():
            late = clock.overdue(self.limit_s)
            if late is None:
                continue
            log.warning("worker process pid %d still building batch %d of epoch %d (task %d) after %.1fs, past "
                        "--task-timeout %gs: killing it; a new process takes its place and the server redoes "
                        "the batch", late.pid, late.index, late.epoch, late.task, late.elapsed_s, self.limit_s)
            kill(worker_id)
            clock.stop()
            if self._counters is not None:
                self._counters.add(timed_out=1)
