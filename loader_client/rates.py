"""Rates over the time between two stats replies.

The server reports totals since it (or a worker, or a client) started, so a figure like "busy
82%" blends the idle minutes before training began with the present. What a user watching a
run, or a callback judging one epoch, needs is the figure over the last interval: the
difference of two consecutive replies. Pure functions, shared by `npyloader stats --watch`
and `DataWaitMonitor`.
"""

from __future__ import annotations

import copy
from typing import Any

Stats = dict[str, Any]


def with_rates(before: Stats | None, after: Stats) -> Stats:
    """`after`, plus figures over the interval since `before` under `recent_*` keys.

    Top level: `interval_s` (None when there is nothing to compare with: no earlier reply, or
    the server restarted in between), `recent_batches_per_s`, `recent_bytes_per_s`.
    Each worker: `recent_batches_per_s`, `recent_busy_pct`; each client: `recent_bytes_per_s`,
    `recent_wait_fraction` and `wait_fraction` (over its whole connection). A worker or client
    that was not in `before` (new, or restarted) gets its figures since it started instead.
    """
    out = copy.deepcopy(after)
    dt = _interval(before, after)
    out["interval_s"] = dt
    out["recent_batches_per_s"] = _per_s(before, after, "batches_served", dt)
    out["recent_bytes_per_s"] = _per_s(before, after, "bytes_served", dt)
    old_workers = {w["id"]: w for w in before["workers"]["list"]} if dt else {}
    for w in out["workers"]["list"]:
        old = old_workers.get(w["id"])
        if old is not None and w["batches"] >= old["batches"] and w["busy_s"] >= old["busy_s"]:
            w["recent_batches_per_s"] = (w["batches"] - old["batches"]) / dt
            w["recent_busy_pct"] = min(100.0, 100.0 * (w["busy_s"] - old["busy_s"]) / dt)
        else:
            w["recent_batches_per_s"] = w["batches_per_s"]
            w["recent_busy_pct"] = w["busy_pct"]
    old_clients = {c["id"]: c for c in before["clients"]} if dt else {}
    for c in out["clients"]:
        c["wait_fraction"] = _fraction(c["wait_s"], c["connected_s"])
        old = old_clients.get(c["id"])
        span = c["connected_s"] - old["connected_s"] if old is not None else 0.0
        if old is not None and span > 0 and c["bytes"] >= old["bytes"]:
            c["recent_bytes_per_s"] = (c["bytes"] - old["bytes"]) / span
            c["recent_wait_fraction"] = _fraction(c["wait_s"] - old["wait_s"], span)
        else:
            c["recent_bytes_per_s"] = c["bytes"] / c["connected_s"] if c["connected_s"] > 0 else 0.0
            c["recent_wait_fraction"] = c["wait_fraction"]
    return out


def _interval(before: Stats | None, after: Stats) -> float | None:
    if before is None:
        return None
    dt = after["uptime_s"] - before["uptime_s"]
    return dt if dt > 0 else None


def _per_s(before: Stats | None, after: Stats, key: str, dt: float | None) -> float | None:
    if dt is None or before is None or after[key] < before[key]:
        return None
    return (after[key] - before[key]) / dt


def _fraction(part: float, whole: float) -> float:
    return min(1.0, max(0.0, part / whole)) if whole > 0 else 0.0
