"""Prometheus metrics scraped over real HTTP from a running server and a remote worker host,
parsed with prometheus_client's own parser, moving as batches flow."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from loader_client import BatchStream, ServerError, protocol, request_stats
from tests.helpers import (
    PAUSE_OP,
    batch_ids,
    http_get,
    metrics_url,
    scrape,
    value,
    wait_for,
    write_id_dataset,
)


def test_server_metrics_move_as_batches_flow(start_server, id_dataset):
    folder, n = id_dataset
    launched = time.monotonic()
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          "--metrics-port", "0", "--metrics-host", "127.0.0.1", workers=2)
    seen_starting_for = time.monotonic() - launched
    url = metrics_url(server.log())
    assert url, server.log()
    before = wait_for(lambda: (s := scrape(url)).get("npyloader_workers") and
                      value(s, "npyloader_workers", kind="local") == 2 and s, 30, "both workers in the metrics")
    assert value(before, "npyloader_batches_served_total", dataset="train") == 0
    assert value(before, "npyloader_dataset_samples", dataset="train") == n
    # Startup, in seconds, lies within the time this test saw the server starting, and indexing
    # is part of startup: a unit slip (ms for s) or a clock started elsewhere breaks either.
    startup = value(before, "npyloader_startup_seconds")
    assert 0 < startup < seen_starting_for, (startup, seen_starting_for)
    assert 0 <= value(before, "npyloader_index_seconds", dataset="train") <= startup

    with BatchStream(server.endpoint, timeout=30) as stream:
        batches = sum(1 for _ in stream)
        during = wait_for(lambda: (s := scrape(url)).get("npyloader_client_batches_total") and s, 10,
                          "the client in the metrics")
        assert value(during, "npyloader_clients_connected", dataset="train") == 1
        [(labels, count)] = during["npyloader_client_batches_total"].items()
        assert dict(labels)["dataset"] == "train" and count == batches
    after = wait_for(lambda: (s := scrape(url)) and value(s, "npyloader_batches_served_total", dataset="train")
                     == batches and s, 10, "the epoch's batches counted")
    assert value(after, "npyloader_batches_built_total", dataset="train") == batches
    assert value(after, "npyloader_bytes_served_total", dataset="train") == n * 17 * 4
    assert value(after, "npyloader_batch_latency_seconds_count", dataset="train") == batches
    assert value(after, "npyloader_batch_latency_seconds_bucket", dataset="train", le="+Inf") == batches
    assert value(after, "npyloader_build_seconds_total", dataset="train", stage="read") > 0
    assert sum(after["npyloader_worker_batches_total"].values()) == batches
    assert value(after, "npyloader_queued_batches", dataset="train") == 0
    assert value(after, "npyloader_credits_outstanding", dataset="train") == 0


def test_rejected_messages_respawns_requeued_and_failed_batches_are_counted(start_server, tmp_path, augment_package):
    """Every fault counter, each fault caused for real: two malformed messages; a batch whose
    file was cut short after indexing, which fails; and the worker SIGKILLed while it builds
    another batch, which is respawned and redoes that batch."""
    module = augment_package("slowpkg", PAUSE_OP)
    write_id_dataset(tmp_path / "d", [16, 16, 16])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16", "--no-shuffle",
                          "--augment", f"{module}:pause:seconds=0.1", "--metrics-port", "0",
                          "--metrics-host", "127.0.0.1", workers=1)
    url = metrics_url(server.log())
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        sock.send_multipart([b"\xc1 not msgpack"])
        sock.send_multipart(protocol.encode("hello", {"dataset": "train"})[:1] + [b"stray frame"])
        assert sock.poll(10_000)
    finally:
        sock.close(0)
    with open(tmp_path / "d" / "part-001.npy", "r+b") as f:
        f.truncate(200)
    with BatchStream(server.endpoint, timeout=60) as stream:
        conn = stream._conn
        with pytest.raises(ServerError, match="part-001.npy"):
            conn.get(0, 1)
        conn.request(0, [2])  # 16 samples of 0.1 s: time enough to kill the worker mid-batch
        busy = wait_for(lambda: [w for w in request_stats(server.endpoint)["workers"]["list"] if w["tasks"]], 30,
                        "the worker building batch 2")
        os.kill(busy[0]["pid"], signal.SIGKILL)
        assert batch_ids(conn.get(0, 2)) == list(range(32, 48)), "the requeued batch, built by the new worker"
    final = wait_for(lambda: (s := scrape(url)) and value(s, "npyloader_worker_respawns_total") >= 1
                     and value(s, "npyloader_requeued_batches_total") >= 1
                     and sum(s.get("npyloader_rejected_messages_total", {}).values()) >= 2 and s, 30,
                     "the rejections, the respawn and the requeued batch counted")
    assert value(final, "npyloader_failed_batches_total") == 1
    assert set(dict(k)["reason"] for k in final["npyloader_rejected_messages_total"]) <= {
        "msgpack", "frames", "version", "unknown_message_type", "lacks_field", "invalid", "extension", "limit",
        "other", "validator_error"}


def test_metric_names_follow_prometheus_conventions(start_server, id_dataset):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--metrics-port", "0",
                          "--metrics-host", "127.0.0.1", workers=1)
    url = metrics_url(server.log())
    with BatchStream(server.endpoint, timeout=30) as stream:
        list(stream)
        families = list(text_string_to_metric_families(http_get(url)[1].decode()))
    for family in families:
        assert re.fullmatch(r"npyloader_[a-z_]+", family.name), family.name
        assert family.documentation, f"{family.name} has no help text"
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", family.name), f"{family.name}: use base units"


@pytest.mark.slow
def test_remote_worker_host_metrics_move_as_it_builds(start_server, start_worker, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          "--worker-bind", "tcp://127.0.0.1:0", workers=0)
    worker = start_worker(server.worker_endpoint, "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                          processes=2)
    url = wait_for(lambda: metrics_url(worker.log()), 30, "the worker's metrics line")
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 60, "two remote workers")
    with BatchStream(server.endpoint, timeout=30) as stream:
        batches = sum(1 for _ in stream)
    s = wait_for(lambda: (s := scrape(url)) and value(s, "npyloader_remote_batches_built_total") == batches and s,
                 10, "the host's batches counted")
    assert value(s, "npyloader_remote_processes") == 2
    assert value(s, "npyloader_remote_sessions_total") >= 2
    assert value(s, "npyloader_remote_build_seconds_total", stage="read") > 0
    assert value(s, "npyloader_remote_info", host=os.uname().nodename,
                 server=server.worker_endpoint) == 1


def test_metrics_port_in_use_is_a_clear_error(start_server, id_dataset):
    import socket

    folder, _ = id_dataset
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server("--data", str(folder), "--label-column", "-1", "--metrics-port", str(port),
                              "--metrics-host", "127.0.0.1", expect_ready=False)
        assert server.proc.wait(60) == 2
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in server.log()
