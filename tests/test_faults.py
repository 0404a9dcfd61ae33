"""Faults that must lose and repeat nothing: a killed server, vanished clients, dead workers."""

from __future__ import annotations

import signal
import socket
import time

import numpy as np
import pytest
import zmq

from loader_client import BatchStream, protocol, request_stats
from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ids(batch) -> list[int]:
    return batch[1].astype(int).tolist()


@pytest.mark.slow
def test_client_resumes_exactly_once_after_the_server_is_killed_and_restarted(start_server, id_dataset):
    folder, n = id_dataset
    args = ("--data", str(folder), "--label-column", "-1", "--batch-size", "8", "--bind",
            f"tcp://127.0.0.1:{free_port()}")
    first = start_server(*args, workers=1)
    got: list[int] = []
    with BatchStream(first.endpoint, timeout=60, prefetch=4) as stream:
        batches = iter(stream)
        for _ in range(5):
            got += ids(next(batches))
        first.stop(signal.SIGKILL)
        start_server(*args, workers=1)
        for batch in batches:
            got += ids(batch)
        assert stream.stats()["reconnects"] >= 1
    assert sorted(got) == list(range(n)), "nothing lost, nothing repeated across the restart"


def test_all_workers_dead_gives_a_clear_timeout_and_recovery_when_they_return(start_server, start_worker, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          "--worker-bind", "tcp://127.0.0.1:0", "--heartbeat", "0.3", workers=0)
    with BatchStream(server.endpoint, timeout=2, prefetch=2) as stream:
        with pytest.raises(TimeoutError, match=f"{server.endpoint}.*workers"):
            next(iter(stream))
        start_worker(server.worker_endpoint)
        wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 1, 30, "a worker to join")
        stream.epoch = 0
        assert sorted(v for batch in stream for v in ids(batch)) == list(range(n))


def test_vanished_clients_are_forgotten(start_server, id_dataset):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--client-timeout", "3", "--heartbeat", "0.3",
                          workers=1)
    ctx = zmq.Context.instance()
    for _ in range(1000):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send_multipart(protocol.encode("hello", {"dataset": "train"}))
        sock.send_multipart(protocol.encode("request", {"epoch": 0, "batches": [0, 1]}))
        sock.close()
    wait_for(lambda: request_stats(server.endpoint)["clients"] == [], 30, "the vanished clients to be dropped")
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert len(list(stream)) == len(stream), "the server still serves"


def test_an_idle_client_that_was_forgotten_carries_on_transparently(start_server, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--client-timeout", "3",
                          "--heartbeat", "0.3", workers=1)
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert sorted(v for batch in stream for v in ids(batch)) == list(range(n))
        wait_for(lambda: request_stats(server.endpoint)["clients"] == [], 20, "the idle client to be forgotten")
        assert sorted(v for batch in stream for v in ids(batch)) == list(range(n)), "the next epoch, complete"
        assert stream.stats()["reconnects"] == 1
