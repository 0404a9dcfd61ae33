"""SIGINT and SIGTERM for the commands that run until stopped: serve, worker, stats --watch.

Ignored signals survive exec. A non-interactive shell starts its background jobs (`cmd &` in a
script) with SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so neither
Ctrl-C nor `kill -INT` would stop the command; some supervisors leave SIGTERM ignored or
blocked. Worse, every child started meanwhile (a server's local workers) inherits that again.
So these commands take both signals over first thing, whatever they inherited.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt_on_stop_signals() -> None:
    """From now on SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does
    by default, so each command's one clean-up path serves both; unblocked, if they were."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def on_stop_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Call `stop` on SIGINT or SIGTERM while inside (a server drains rather than unwinding at
    whatever line it was on); the handlers from before afterwards."""
    previous = {sig: signal.signal(sig, lambda *_: stop()) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
