"""`npyloader stats --watch`: a live view of a running server, refreshed every interval.

Three renderings of the same figures, chosen by where the output goes: on a terminal the
view is redrawn in place with plain ANSI cursor codes (no curses, so it works over ssh and in
any terminal emulator) and cut to the terminal's size; into a pipe or file each refresh is a
timestamped block of plain lines, so `| tee log` and log shippers get readable text; with
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
from typing import Any, TextIO

from loader_client.rates import Stats, with_rates
from loader_client.stream import ServerError

HOME = "\x1b[H"
CLEAR_SCREEN = "\x1b[2J"
CLEAR_LINE_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def run(endpoint: str, interval: float, fetch: Callable[[], Stats], *, as_json: bool = False,
        out: TextIO = sys.stdout) -> int:
    """Refresh until Ctrl-C (or the reader of a pipe goes away), then return 0: stopping a
    watch is the normal way to end it."""
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
        _redraw(out, view(endpoint, stats))
    else:
        out.write(f"--- {_now()}\n" + "\n".join(view(endpoint, stats)) + "\n\n")


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


def view(endpoint: str, s: Stats) -> list[str]:
    """The figures as compact aligned tables: header, datasets, clients, workers.

    MB/S, WAIT, BATCHES/S and BUSY are over the span the header names (the last interval, or
    since start on the first refresh); WAIT TOTAL is over the client's whole connection.
    """
    dt = s["interval_s"]
    head = (f"npyloader {endpoint}  up {_duration(s['uptime_s'])}, {s['batches_served']} batches, "
            f"{s['bytes_served'] / 1e6:.1f} MB served; ")
    head += (f"last {dt:.1f}s: {s['recent_batches_per_s']:.1f} batches/s, {s['recent_bytes_per_s'] / 1e6:.1f} MB/s"
             if dt else "rates since start")
    w = s["workers"]
    lines = [head, f"workers {w['alive']} alive, {w['ready']} ready, {w['respawns']} respawned, "
                   f"{w['requeued_batches']} batches requeued"]
    if s.get("rejected"):
        lines.append("rejected messages: " + ", ".join(f"{k} {v}" for k, v in s["rejected"].items()))
    clients_of: dict[str, list[dict[str, Any]]] = {}
    for c in s["clients"]:
        clients_of.setdefault(c["dataset"], []).append(c)
    lines += ["", *table(
        ["DATASET", "SAMPLES", "BATCHES", "BATCH", "CLIENTS", "QUEUED"],
        [[name, d["samples"], d["batches"], d["batch_size"], len(clients_of.get(name, [])),
          d["queued"]] for name, d in s["datasets"].items()])]
    lines += ["", *table(
        ["CLIENT", "DATASET", "BATCHES", "MB", "MB/S", "WAIT", "WAIT TOTAL"],
        [[c["id"][:8], c["dataset"], c["batches"], f"{c['bytes'] / 1e6:.1f}", f"{c['recent_bytes_per_s'] / 1e6:.1f}",
          f"{c['recent_wait_fraction']:.0%}", f"{c['wait_fraction']:.0%}"] for c in s["clients"]])]
    lines += ["", *table(
        ["WORKER", "WHERE", "HOST", "PID", "BATCHES/S", "BUSY", "HEARTBEAT"],
        [[wk["id"], "local" if wk["local"] else "remote", wk["host"], wk["pid"], f"{wk['recent_batches_per_s']:.1f}",
          f"{wk['recent_busy_pct']:.0f}%", f"{wk['last_heartbeat_s']:.1f}s ago"] for wk in w["list"]])]
    return lines


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns as wide as their widest cell; text left, numbers right, so digits line up."""
    if not rows:
        return [headers[0] + "  (none)"]
    cells = [headers, *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_numeric(row[i]) for row in cells[1:]) for i in range(len(headers))]
    return ["  ".join(cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)).rstrip()
            for row in cells]


def _numeric(cell: str) -> bool:
    return cell.rstrip("%").replace(".", "", 1).isdigit()


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
