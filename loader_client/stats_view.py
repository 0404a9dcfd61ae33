"""One stats reply as text: the tables that `npyloader stats` prints and `--watch` redraws.

Both commands show the same figures, so they share this one renderer: a header with the
server's throughput, then aligned tables of datasets, clients and workers. It takes a reply
that has passed through `rates.with_rates`, so a one-off `npyloader stats` (no earlier reply:
rates since start) and each refresh of a watch (rates over the last interval) read the same
way. Pure functions of a dict, so they are testable without a server.
"""

from __future__ import annotations

from typing import Any

from loader_client.rates import Stats


def render(endpoint: str, s: Stats) -> list[str]:
    """The figures as compact aligned tables: header, datasets, clients, workers.

    MB/S, WAIT, BATCHES/S and BUSY are over the span the header names (the last interval, or
    since start when there is no earlier reply); WAIT TOTAL is over the client's whole
    connection, and BATCHES, MB and a worker's BATCHES are totals.
    """
    dt = s["interval_s"]
    head = (f"npyloader {endpoint}  up {_duration(s['uptime_s'])}, {s['batches_served']} batches, "
            f"{s['bytes_served'] / 1e6:.1f} MB served; ")
    head += (f"last {dt:.1f}s: {s['recent_batches_per_s']:.1f} batches/s, {s['recent_bytes_per_s'] / 1e6:.1f} MB/s"
             if dt else "rates since start")
    w = s["workers"]
    lines = [head, f"workers {w['alive']} alive, {w['ready']} ready, {w['respawns']} respawned, "
                   f"{w['requeued_batches']} batches requeued, {w.get('timed_out_batches', 0)} timed out"]
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
        ["CLIENT", "DATASET", "VIA", "BATCHES", "MB", "MB/S", "QUEUED", "WAIT", "WAIT TOTAL"],
        [[c["id"][:12], c["dataset"], c.get("transport", "socket"), c["batches"], f"{c['bytes'] / 1e6:.1f}",
          f"{c['recent_bytes_per_s'] / 1e6:.1f}", c["pending"], f"{c['recent_wait_fraction']:.0%}",
          f"{c['wait_fraction']:.0%}"] for c in s["clients"]])]
    lines += ["", *table(
        ["WORKER", "WHERE", "HOST", "PID", "BATCHES", "BATCHES/S", "BUSY", "HEARTBEAT"],
        [[wk["id"], "local" if wk["local"] else "remote", wk["host"], wk["pid"], wk["batches"],
          f"{wk['recent_batches_per_s']:.1f}", f"{wk['recent_busy_pct']:.0f}%", f"{wk['last_heartbeat_s']:.1f}s ago"]
         for wk in w["list"]])]
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
