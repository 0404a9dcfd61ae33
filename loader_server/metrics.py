"""Counters the broker keeps, and their Prometheus exposition.

The broker is single-threaded and owns every counter; it publishes a snapshot of its stats
(the very dict `npyloader stats --json` prints) a few times a second. The Prometheus exporter
runs in its own thread and turns the latest snapshot into metric families at scrape time, so
scrapes never touch live broker state, and `npyloader stats` and Prometheus always agree.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Request-to-send latency: from a client's request reaching the broker to the batch leaving it.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense, kept without locks by one thread."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> dict[str, Any]:
        cumulative, running = [], 0
        for c in self.counts:
            running += c
            cumulative.append(running)
        return {"le": [*self.bounds, "+Inf"], "cumulative": cumulative, "sum": round(self.total, 6),
                "count": running}


@dataclass
class DatasetCounters:
    """What happened to one dataset since the server started."""

    batches_built: int = 0
    worker_busy_s: float = 0.0
    worker_read_s: float = 0.0
    worker_augment_s: float = 0.0
    batches_served: int = 0
    bytes_served: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def built(self, busy_s: float, read_s: float, augment_s: float) -> None:
        self.batches_built += 1
        self.worker_busy_s += busy_s
        self.worker_read_s += read_s
        self.worker_augment_s += augment_s

    def served(self, nbytes: int, latency_s: float | None) -> None:
        self.batches_served += 1
        self.bytes_served += nbytes
        if latency_s is not None:
            self.latency.observe(latency_s)

    def snapshot(self) -> dict[str, Any]:
        return {"batches_built": self.batches_built, "worker_busy_s": round(self.worker_busy_s, 6),
                "worker_read_s": round(self.worker_read_s, 6), "worker_augment_s": round(self.worker_augment_s, 6),
                "batches_served": self.batches_served, "bytes_served": self.bytes_served,
                "latency_s": self.latency.snapshot()}


# -- Prometheus --------------------------------------------------------------------------------


def server_families(s: dict[str, Any]) -> Iterator[Any]:
    """Metric families of a server, from one stats snapshot. Names follow Prometheus
    conventions: base units, `_total` for counters, labels for dataset, client and worker."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def family(kind: Callable[..., Any], name: str, doc: str, labels: Iterable[str],
               rows: Iterable[tuple[list[str], float]]) -> Any:
        metric = kind(name, doc, labels=list(labels))
        for values, value in rows:
            metric.add_metric(values, value)
        return metric

    datasets = s["datasets"]
    per_ds = lambda key: [([n], d[key]) for n, d in datasets.items()]  # noqa: E731
    yield family(CounterMetricFamily, "npyloader_batches_served", "Batches sent to clients.", ["dataset"],
                 per_ds("batches_served"))
    yield family(CounterMetricFamily, "npyloader_bytes_served", "Array bytes sent to clients.", ["dataset"],
                 per_ds("bytes_served"))
    yield family(CounterMetricFamily, "npyloader_batches_built", "Batches built by workers (local and remote).",
                 ["dataset"], per_ds("batches_built"))
    yield family(CounterMetricFamily, "npyloader_build_seconds",
                 "Worker time spent building batches, by stage: read (files to memory) and augment.",
                 ["dataset", "stage"],
                 [([n, stage], d[f"worker_{stage}_s"]) for n, d in datasets.items() for stage in ("read", "augment")])
    latency = HistogramMetricFamily("npyloader_batch_latency_seconds",
                                    "From a client's request reaching the server to the batch being sent.",
                                    labels=["dataset"])
    for n, d in datasets.items():
        h = d["latency_s"]
        buckets = [(str(le) if le != "+Inf" else "+Inf", c) for le, c in zip(h["le"], h["cumulative"])]
        latency.add_metric([n], buckets, h["sum"])
    yield latency
    yield family(GaugeMetricFamily, "npyloader_queued_batches", "Requested batches waiting for a worker.",
                 ["dataset"], per_ds("queued"))
    yield family(GaugeMetricFamily, "npyloader_credits_outstanding",
                 "Batches clients asked for that are not yet sent (queued, being built or waiting to send).",
                 ["dataset"], per_ds("outstanding"))
    yield family(GaugeMetricFamily, "npyloader_free_slots", "Free shared-memory batch slots.", ["dataset"],
                 per_ds("free_slots"))
    yield family(GaugeMetricFamily, "npyloader_dataset_samples", "Samples per epoch.", ["dataset"],
                 per_ds("samples"))
    yield family(GaugeMetricFamily, "npyloader_index_seconds", "Time to index the dataset at startup.",
                 ["dataset"], per_ds("index_s"))

    clients = s["clients"]
    yield family(GaugeMetricFamily, "npyloader_clients_connected", "Clients with a session.", ["dataset"],
                 [([n], sum(c["dataset"] == n for c in clients)) for n in datasets])
    by_client = lambda key: [([c["dataset"], c["id"]], c[key]) for c in clients]  # noqa: E731
    yield family(CounterMetricFamily, "npyloader_client_batches", "Batches sent to this client.",
                 ["dataset", "client"], by_client("batches"))
    yield family(CounterMetricFamily, "npyloader_client_bytes", "Array bytes sent to this client.",
                 ["dataset", "client"], by_client("bytes"))
    yield family(CounterMetricFamily, "npyloader_client_wait_seconds",
                 "Time the client's training loop waited for data, as the client last reported it "
                 "(its rate is the fraction of time training was starved).",
                 ["dataset", "client"], by_client("wait_s"))
    yield family(GaugeMetricFamily, "npyloader_client_outstanding_batches",
                 "Batches this client asked for that are not yet sent.", ["dataset", "client"],
                 by_client("outstanding"))
    yield family(GaugeMetricFamily, "npyloader_clients_by_transport",
                 "Clients with a session, by how batches reach them: shm (read from the server's shared "
                 "memory, on its host) or socket.", ["dataset", "transport"],
                 [([n, t], sum(c["dataset"] == n and c.get("transport") == t for c in clients))
                  for n in datasets for t in ("shm", "socket")])
    yield family(GaugeMetricFamily, "npyloader_client_slots_held",
                 "Shared-memory slots lent to this client and not yet given back.", ["dataset", "client"],
                 by_client("slots_held"))

    w = s["workers"]
    workers = w["list"]
    yield family(GaugeMetricFamily, "npyloader_workers", "Workers ready for tasks.", ["kind"],
                 [(["local"], sum(x["local"] for x in workers)), (["remote"], sum(not x["local"] for x in workers))])
    by_worker = lambda key: [([x["id"], x["host"]], x[key]) for x in workers]  # noqa: E731
    yield family(CounterMetricFamily, "npyloader_worker_batches", "Batches this worker built.",
                 ["worker", "host"], by_worker("batches"))
    yield family(CounterMetricFamily, "npyloader_worker_busy_seconds", "Time this worker spent building batches.",
                 ["worker", "host"], by_worker("busy_s"))
    yield family(GaugeMetricFamily, "npyloader_worker_tasks", "Batches assigned to this worker now.",
                 ["worker", "host"], by_worker("tasks"))
    yield family(CounterMetricFamily, "npyloader_worker_respawns", "Local worker processes restarted.", [],
                 [([], w["respawns"])])
    yield family(CounterMetricFamily, "npyloader_requeued_batches",
                 "Batches redone because their worker died or went silent.", [], [([], w["requeued_batches"])])
    yield family(CounterMetricFamily, "npyloader_timed_out_batches",
                 "Batches whose worker was still building them past --task-timeout (each is redone, or "
                 "failed after three in a row).", [], [([], w["timed_out_batches"])])
    yield family(CounterMetricFamily, "npyloader_failed_batches", "Batches that failed and were reported to clients.",
                 [], [([], s["failed_batches"])])
    yield family(CounterMetricFamily, "npyloader_rejected_messages", "Received messages refused by validation.",
                 ["reason"], [([reason], count) for reason, count in s["rejected"].items()])
    yield family(GaugeMetricFamily, "npyloader_startup_seconds", "From process start to serving.", [],
                 [([], s["startup_s"])])
    yield family(GaugeMetricFamily, "npyloader_uptime_seconds", "Time since the server started serving.", [],
                 [([], s["uptime_s"])])


class SnapshotCollector:
    """A prometheus_client collector over whatever `latest()` returns at scrape time."""

    def __init__(self, latest: Callable[[], dict[str, Any] | None],
                 families: Callable[[dict[str, Any]], Iterator[Any]]) -> None:
        self._latest = latest
        self._families = families

    def collect(self) -> Iterator[Any]:
        snapshot = self._latest()
        if snapshot is not None:
            yield from self._families(snapshot)


def start_exporter(port: int, host: str, collector: SnapshotCollector, what: str) -> Any:
    """Serve /metrics on host:port from its own registry (no process-wide default metrics of
    other libraries mixed in); returns the HTTP server, to shut down on exit."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        from loader_server.config import ConfigError

        raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                          "choose another port") from e
    log.info("%s metrics for Prometheus at http://%s:%d/metrics", what, host, server.server_port)
    return server


# -- a remote worker host (`npyloader worker --metrics-port`) ------------------------------------

SHARED_FIELDS = ("batches", "failed", "busy_s", "read_s", "augment_s", "sessions", "timed_out")


class SharedCounters:
    """Totals that a host's worker processes add to and its supervisor exports: one shared
    array under one lock, so counts survive a worker process that dies and is replaced."""

    def __init__(self, ctx: Any) -> None:
        self._array = ctx.Array("d", len(SHARED_FIELDS))

    def add(self, **values: float) -> None:
        with self._array.get_lock():
            for name, value in values.items():
                self._array[SHARED_FIELDS.index(name)] += value

    def snapshot(self) -> dict[str, float]:
        with self._array.get_lock():
            return dict(zip(SHARED_FIELDS, self._array[:]))


def worker_families(s: dict[str, Any]) -> Iterator[Any]:
    """Metric families of one `npyloader worker` host: what its processes built for the server.
    Prefixed npyloader_remote_ so that sums over a server's own npyloader_worker_* series
    (which count remote workers' batches too) are not doubled."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    def one(kind: Callable[..., Any], name: str, doc: str, value: float) -> Any:
        metric = kind(name, doc, labels=[])
        metric.add_metric([], value)
        return metric

    yield InfoMetricFamily("npyloader_remote", "This worker host and the server it serves.",
                           value={"server": s["server"], "host": s["host"]})
    yield one(CounterMetricFamily, "npyloader_remote_batches_built", "Batches built and sent to the server.",
              s["batches"])
    yield one(CounterMetricFamily, "npyloader_remote_failed_batches", "Batches that failed to build.", s["failed"])
    yield one(CounterMetricFamily, "npyloader_remote_timed_out_batches",
              "Worker processes killed for building one batch past this host's --task-timeout.", s["timed_out"])
    yield one(CounterMetricFamily, "npyloader_remote_busy_seconds", "Time spent building batches.", s["busy_s"])
    stages = CounterMetricFamily("npyloader_remote_build_seconds", "Build time by stage.", labels=["stage"])
    stages.add_metric(["read"], s["read_s"])
    stages.add_metric(["augment"], s["augment_s"])
    yield stages
    yield one(CounterMetricFamily, "npyloader_remote_sessions",
              "Times a process joined the server (more than the processes: reconnects).", s["sessions"])
    yield one(GaugeMetricFamily, "npyloader_remote_processes", "Worker processes alive on this host.", s["alive"])
    yield one(CounterMetricFamily, "npyloader_remote_respawns", "Worker processes restarted on this host.",
              s["respawns"])
