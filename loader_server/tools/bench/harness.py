"""What every baseline hands the bench's runner: epochs to time and a close() that leaves nothing behind.

Apart from the baselines themselves so that a loader in its own module (torch, Grain, the path
through Keras's fit) shares the same contract without importing every other framework.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from loader_server.tools.bench.plan import Batch

log = logging.getLogger(__name__)

# Batches a loader may hold ready ahead of the trainer: Keras's max_queue_size, Grain's buffers
# summed over its workers, npyloader's prefetch in the runner. One depth, so no loader wins by
# buffering more.
PREFETCH_BATCHES = 16
# Ends the name of a loader's row through `model.fit` (via_fit.py).
THROUGH_FIT = ", through fit"


class BaselineUnavailable(RuntimeError):
    """A baseline that cannot run here (a package is missing); the message says how to enable it."""


@dataclass
class Baseline:
    name: str
    epoch: Callable[[int], Iterator[Batch]]
    close: Callable[[], None]


def _nothing(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class FitInput:
    """A loader as its user hands it to `model.fit`, from some epoch on.

    `x` is what they pass (a PyDataset or its adapter, a torch DataLoader, a Grain dataset);
    `steps_per_epoch` is set where `x` runs on across epochs (Keras then keeps one iterator);
    `on_epoch_begin(epoch)` is what their Keras callback does to point the loader at an epoch;
    `stop` ends every pool and process the loader started.
    """

    x: Any
    steps_per_epoch: int | None = None
    on_epoch_begin: Callable[[int], None] = _nothing
    stop: Callable[[], None] = _nothing


@dataclass(frozen=True)
class FitLoader:
    """A loader's row name and, for a first epoch, a fresh FitInput starting there."""

    name: str
    start: Callable[[int], FitInput]


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def make_baseline(name: str, epochs: Callable[[int], Generator[Batch, None, None]],
                  stop: Callable[[], None] = lambda: None) -> Baseline:
    """Wrap an epoch generator so that close() first ends any epoch still open, then `stop`s."""
    open_epochs: weakref.WeakSet[Generator[Batch, None, None]] = weakref.WeakSet()
    closed = False

    def epoch(n: int) -> Iterator[Batch]:
        if closed:
            raise RuntimeError(f"{name}: epoch({n}) after close()")
        batches = epochs(n)
        open_epochs.add(batches)
        return batches

    def close() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        for batches in list(open_epochs):
            batches.close()
        stop()
        log.debug("%s: closed", name)

    return Baseline(name, epoch, close)
