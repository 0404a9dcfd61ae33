"""Faults that must lose and repeat nothing: a killed server, vanished clients, dead workers."""

from __future__ import annotations

import signal

import pytest
import zmq

from loader_client import BatchStream, protocol, request_stats
from tests.conftest import free_port, wait_for


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


def truncate_data(path) -> None:
    """Cut a file short after the server indexed it, as a failing disk or a careless copy would."""
    with open(path, "r+b") as f:
        f.truncate(200)


def test_a_file_truncated_while_serving_fails_only_its_batches_naming_it(start_server, tmp_path):
    from loader_client import ServerError
    from tests.conftest import write_id_dataset

    write_id_dataset(tmp_path / "d", [16, 16, 16])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16",
                          "--no-shuffle", workers=1)
    truncate_data(tmp_path / "d" / "part-001.npy")
    with BatchStream(server.endpoint, timeout=30) as stream:
        conn = stream._conn
        assert ids(conn.get(0, 0)) == list(range(16))
        with pytest.raises(ServerError, match="part-001.npy"):
            conn.get(0, 1)
        assert ids(conn.get(0, 2)) == list(range(32, 48)), "other batches keep flowing"


def test_on_bad_file_skip_serves_the_rest_of_every_batch(start_server, tmp_path):
    from tests.conftest import write_id_dataset

    write_id_dataset(tmp_path / "d", [40, 40, 40])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16",
                          "--on-bad-file", "skip", workers=2)
    truncate_data(tmp_path / "d" / "part-001.npy")
    with BatchStream(server.endpoint, timeout=30) as stream:
        got = sorted(v for batch in stream for v in ids(batch))
    assert got == list(range(40)) + list(range(80, 120)), "every readable sample exactly once"
    wait_for(lambda: "skipping unreadable samples of" in server.log() and "part-001.npy" in server.log(), 10,
             "the skipped file to be named in the log")
