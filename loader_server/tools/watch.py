"""`npyloader stats --watch`: a live view of a running server, refreshed every interval.

Three presentations of the same figures, chosen by where the output goes: on a terminal the
view (`loader_client.stats_view`: the tables `npyloader stats` prints) is redrawn in place
with plain ANSI cursor codes (no curses, so it works over ssh and in any terminal emulator)
and cut to the terminal's size; into a pipe or file each refresh is a timestamped block of
the same plain lines, so `| tee log` and log shippers get readable text; with
`--json` each refresh is one JSON object per line. Rates are over the last interval (the
difference of two consecutive replies), since totals since startup hide what is happening now.
A server that stops answering is reported and retried, never a crash: the point of watching
is often to see a restart come back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

from loader_client.rates import Stats, with_rates
from loader_client.stats_view import render
from loader_client.stream import ServerError

HOME = "\x1b[H"
CLEAR_SCREEN = "\x1b[2J"
CLEAR_LINE_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def run(endpoint: str, interval: float, fetch: Callable[[], Stats], *, as_json: bool = False,
        out: TextIO = sys.stdout) -> int:
    """Refresh until Ctrl-C or SIGTERM (the CLI makes both raise KeyboardInterrupt, whatever was
    inherited) or until the reader of a pipe goes away, then return 0: stopping a watch is the
    normal way to end it."""
    tty = out.isatty() and not as_json
    before: Stats | None = None
    try:
        if tty:
            out.write(HIDE_CURSOR + CLEAR_SCREEN)
        while True:
            started = time.monotonic()
            try:
                stats = with_rates(before, fetch())
            except (TimeoutError, ServerError) as e:
                before = None
                _show_failure(out, endpoint, e, tty=tty, as_json=as_json)
            else:
                before = stats
                _show(out, endpoint, stats, tty=tty, as_json=as_json)
            out.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `| head`: the reader has all it wanted; point stdout at nothing so that the flush at
        # exit does not complain a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    finally:
        if tty:
            out.write(SHOW_CURSOR + "\n")
            out.flush()


def _show(out: TextIO, endpoint: str, stats: Stats, *, tty: bool, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"time": time.time(), "endpoint": endpoint, **stats}, sort_keys=True) + "\n")
    elif tty:
        _redraw(out, render(endpoint, stats))
    else:
        out.write(f"--- {_now()}\n" + "\n".join(render(endpoint, stats)) + "\n\n")


def _show_failure(out: TextIO, endpoint: str, error: Exception, *, tty: bool, as_json: bool) -> None:
    line = f"no answer from {endpoint} (retrying)"
    if as_json:
        out.write(json.dumps({"time": time.time(), "endpoint": endpoint, "error": line, "reason": str(error)}) + "\n")
    elif tty:
        _redraw(out, [f"{_now()}  {line}", str(error)])
    else:
        out.write(f"--- {_now()}  {line}: {error}\n")


def _redraw(out: TextIO, lines: list[str]) -> None:
    """Overwrite in place line by line rather than clearing first, so the view never flickers."""
    size = shutil.get_terminal_size()
    out.write(HOME + "".join(line + CLEAR_LINE_END + "\n" for line in fit(lines, size.columns, size.lines))
              + CLEAR_BELOW)


def _now() -> str:
    return datetime.now().isoformat(sep=" ", timespec="seconds")


def fit(lines: list[str], columns: int, rows: int) -> list[str]:
    """Cut to the terminal: a wrapped line would scroll the view off its own top line."""
    lines = [line[:max(1, columns - 1)] for line in lines]
    room = max(1, rows - 1)
    if len(lines) > room:
        hidden = len(lines) - room + 1
        lines = lines[:room - 1] + [f"... {hidden} more lines (enlarge the terminal, or use --json)"[:max(1, columns - 1)]]
    return lines
