"""Faults that must lose and repeat nothing: a killed server, vanished clients, dead workers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import zmq

from loader_client import BatchStream, protocol, request_stats
from tests.helpers import batch_ids, free_port, wait_for


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
            got += batch_ids(next(batches))
        first.stop(signal.SIGKILL)
        start_server(*args, workers=1)
        for batch in batches:
            got += batch_ids(batch)
        assert stream.stats()["reconnects"] >= 1
    assert sorted(got) == list(range(n)), "nothing lost, nothing repeated across the restart"


@pytest.mark.slow
def test_two_clients_keep_their_own_ids_and_counts_across_a_server_restart(start_server, id_dataset):
    folder, _ = id_dataset
    args = ("--data", str(folder), "--label-column", "-1", "--batch-size", "8", "--bind",
            f"tcp://127.0.0.1:{free_port()}")
    first = start_server(*args, workers=1)

    def served(endpoint: str) -> dict[str, int]:
        return {c["id"]: c["batches"] for c in request_stats(endpoint)["clients"]}

    with BatchStream(first.endpoint, timeout=60) as a, BatchStream(first.endpoint, timeout=60) as b:
        # one batch asked for at a time, so the server's count is exactly what each read
        for conn, count in ((a._conn, 2), (b._conn, 4)):
            for i in range(count):
                conn.get(0, i)
        ids = a.stats()["id"], b.stats()["id"]
        assert ids[0] != ids[1]
        assert served(first.endpoint) == {ids[0]: 2, ids[1]: 4}
        first.stop(signal.SIGKILL)
        second = start_server(*args, workers=1)
        for conn, start, count in ((a._conn, 2, 3), (b._conn, 4, 1)):
            for i in range(start, start + count):
                conn.get(0, i)
        assert a.stats()["reconnects"] == b.stats()["reconnects"] == 1
        assert served(second.endpoint) == {ids[0]: 3, ids[1]: 1}, "each came back under its own id"


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
        assert sorted(v for batch in stream for v in batch_ids(batch)) == list(range(n))


def test_an_idle_client_that_was_forgotten_carries_on_transparently(start_server, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--client-timeout", "3",
                          "--heartbeat", "0.3", workers=1)
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert sorted(v for batch in stream for v in batch_ids(batch)) == list(range(n))
        wait_for(lambda: request_stats(server.endpoint)["clients"] == [], 20, "the idle client to be forgotten")
        assert sorted(v for batch in stream for v in batch_ids(batch)) == list(range(n)), "the next epoch, complete"
        assert stream.stats()["reconnects"] == 1


def truncate_data(path) -> None:
    """Cut a file short after the server indexed it, as a failing disk or a careless copy would."""
    with open(path, "r+b") as f:
        f.truncate(200)


def test_a_file_truncated_while_serving_fails_only_its_batches_naming_it(start_server, tmp_path):
    from loader_client import ServerError
    from tests.helpers import write_id_dataset

    write_id_dataset(tmp_path / "d", [16, 16, 16])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16",
                          "--no-shuffle", workers=1)
    truncate_data(tmp_path / "d" / "part-001.npy")
    with BatchStream(server.endpoint, timeout=30) as stream:
        conn = stream._conn
        assert batch_ids(conn.get(0, 0)) == list(range(16))
        with pytest.raises(ServerError, match="part-001.npy"):
            conn.get(0, 1)
        assert batch_ids(conn.get(0, 2)) == list(range(32, 48)), "other batches keep flowing"
    stats = request_stats(server.endpoint)
    assert stats["failed_batches"] == 1 and stats["workers"]["requeued_batches"] == 0, stats


def test_on_bad_file_skip_serves_the_rest_of_every_batch(start_server, tmp_path):
    from tests.helpers import write_id_dataset

    write_id_dataset(tmp_path / "d", [40, 40, 40])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16",
                          "--on-bad-file", "skip", workers=2)
    truncate_data(tmp_path / "d" / "part-001.npy")
    with BatchStream(server.endpoint, timeout=30) as stream:
        got = sorted(v for batch in stream for v in batch_ids(batch))
    assert got == list(range(40)) + list(range(80, 120)), "every readable sample exactly once"
    assert request_stats(server.endpoint)["failed_batches"] == 0, "skipping fails no batch"
    wait_for(lambda: "skipping unreadable samples of" in server.log() and "part-001.npy" in server.log(), 10,
             "the skipped file to be named in the log")


CRASH_OP = ("import os, signal\n\n"
            "def crash_on(x, y, rng, sample=-1):\n"
            "    if int(y) == sample:\n"
            "        os.kill(os.getpid(), signal.SIGBUS)  # what a read error in a memory-mapped file does\n"
            "    return x, y\n")


@pytest.mark.slow
def test_a_batch_that_kills_every_worker_is_failed_naming_its_files_after_three_tries(
        start_server, tmp_path, augment_package):
    from loader_client import ServerError
    from tests.helpers import write_id_dataset

    module = augment_package("crashpkg", CRASH_OP)
    n = write_id_dataset(tmp_path / "d", [16, 16, 16])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "8",
                          "--no-shuffle", "--augment", f"{module}:crash_on:sample=21", workers=2)
    got: list[int] = []
    with BatchStream(server.endpoint, timeout=60) as stream:
        conn = stream._conn
        conn.request(0, list(range(6)))
        for index in range(6):
            if index == 2:
                with pytest.raises(ServerError, match=r"took down 3 workers in a row \(last: worker \S+ was killed "
                                                      r"by SIGBUS\).*part-001\.npy"):
                    conn.get(0, index)
            else:
                got += batch_ids(conn.get(0, index))
    assert sorted(got) == sorted(set(range(n)) - set(range(16, 24))), "every other batch exactly once"
    stats = wait_for(lambda: (s := request_stats(server.endpoint))["workers"]["respawns"] >= 3 and s, 30,
                     "three crashed workers replaced")
    # redone after the first two crashes (with whatever else those workers held), failed at the third
    assert stats["workers"]["requeued_batches"] >= 2 and stats["failed_batches"] == 1, stats
    wait_for(lambda: len(server.workers()) == 2, 30, "two live workers again")


RAISE_OP = ("def reject_sample(x, y, rng, sample=-1):\n"
            "    if int(y) == sample:\n"
            "        raise ValueError(f'sample {int(y)} is not welcome here')\n"
            "    return x, y\n")


@pytest.mark.parametrize("where", ["local", "remote"])
def test_an_augment_op_that_raises_fails_its_batch_with_the_workers_traceback(
        start_server, start_worker, tmp_path, monkeypatch, where):
    from loader_client import ServerError
    from tests.helpers import write_id_dataset

    (tmp_path / "raisepkg").mkdir()
    (tmp_path / "raisepkg" / "__init__.py").write_text("")
    (tmp_path / "raisepkg" / "augs.py").write_text(RAISE_OP)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    write_id_dataset(tmp_path / "d", [16, 16, 16])
    args = ("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "8", "--no-shuffle",
            "--augment", "raisepkg.augs:reject_sample:sample=21")
    if where == "local":
        server = start_server(*args, workers=1)
        worker_log = server.log
    else:
        server = start_server(*args, "--worker-bind", "tcp://127.0.0.1:0", workers=0)
        worker_log = start_worker(server.worker_endpoint).log
        wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 1, 60, "the remote worker")
    with BatchStream(server.endpoint, timeout=60) as stream:
        conn = stream._conn
        with pytest.raises(ServerError) as failed:
            conn.get(0, 2)
        assert batch_ids(conn.get(0, 3)) == list(range(24, 32)), "the worker carries on with the next batch"
    text = str(failed.value)
    assert re.search(r"could not build batch 2 of epoch 0 of 'train': worker \S+ failed: sample 21 "
                     r"\(\S*part-001\.npy row 5\): augment op 'raisepkg\.augs:reject_sample:sample=21' failed: "
                     r"sample 21 is not welcome here", text), text
    assert "\nOriginal Traceback (most recent call last):\n" in text and ", in reject_sample\n" in text, text
    assert text.rstrip().endswith("sample 21 is not welcome here"), "the traceback ends with the exception line"
    wait_for(lambda: "Traceback (most recent call last)" in worker_log() and ", in reject_sample" in worker_log(),
             10, "the traceback in the worker's log")


def drop_read_permission(path) -> None:
    os.chmod(path, 0)


def remove(path) -> None:
    os.remove(path)


def no_dac_override() -> tuple[str, ...]:
    """Root reads any file whatever its mode; without these capabilities it obeys the mode."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search")


@pytest.mark.parametrize("damage", [remove, drop_read_permission])
def test_a_file_removed_or_made_unreadable_while_serving_fails_only_its_batches(start_server, tmp_path, damage):
    from loader_client import ServerError
    from tests.helpers import write_id_dataset

    write_id_dataset(tmp_path / "d", [16, 16, 16])
    prefix = no_dac_override() if damage is drop_read_permission else ()
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16",
                          "--no-shuffle", workers=1, prefix=prefix)
    damage(tmp_path / "d" / "part-001.npy")
    with BatchStream(server.endpoint, timeout=30) as stream:
        conn = stream._conn
        assert batch_ids(conn.get(0, 0)) == list(range(16))
        with pytest.raises(ServerError, match=r"part-001\.npy row \d+\): cannot read"):
            conn.get(0, 1)
        assert batch_ids(conn.get(0, 2)) == list(range(32, 48)), "other batches keep flowing"
    stats = request_stats(server.endpoint)
    assert stats["failed_batches"] == 1 and stats["workers"]["requeued_batches"] == 0, stats


@pytest.mark.slow
def test_all_workers_dying_at_once_mid_epoch_times_out_clearly_then_resumes_exactly_once(
        start_server, start_worker, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "8",
                          "--worker-bind", "tcp://127.0.0.1:0", "--heartbeat", "0.3", workers=0)
    first = start_worker(server.worker_endpoint, processes=2)
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 60, "two workers")
    got: list[int] = []
    with BatchStream(server.endpoint, timeout=3) as stream:
        conn, batches = stream._conn, len(stream)
        for index in range(5):
            got += batch_ids(conn.get(0, index))
        for pid in [first.proc.pid, *first.pids()]:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 0, 30, "the dead workers retired")
        conn.request(0, list(range(5, batches)))
        with pytest.raises(TimeoutError, match=f"{server.endpoint}.*are its workers running"):
            conn.get(0, 5)
        start_worker(server.worker_endpoint, processes=1)
        for index in range(5, batches):
            got += batch_ids(conn.get(0, index))
    assert sorted(got) == list(range(n)), "nothing lost, nothing repeated"
    assert request_stats(server.endpoint)["failed_batches"] == 0, "the batches waited for workers; none failed"


def test_vanished_clients_are_forgotten_and_leak_no_memory(start_server, id_dataset):
    from tests.helpers import rss_mb

    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--client-timeout", "3", "--heartbeat", "0.3",
                          workers=1)

    def vanish(count: int) -> None:
        ctx = zmq.Context.instance()
        for _ in range(count):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.endpoint)
            sock.send_multipart(protocol.encode("hello", {"dataset": "train"}))
            sock.send_multipart(protocol.encode("request", {"epoch": 0, "batches": [0, 1]}))
            sock.close()
        wait_for(lambda: request_stats(server.endpoint)["clients"] == [], 30, "the vanished clients to be dropped")

    vanish(300)  # warm-up: allocator pools and ZeroMQ's own buffers reach their working size
    before = rss_mb(server.proc.pid)
    vanish(1000)
    grown = rss_mb(server.proc.pid) - before
    # Each forgotten client held a session and two batches; a leak of even 10 KB each would show as 10 MB.
    assert grown < 8, f"server RSS grew {grown:.1f} MB over 1,000 vanished clients"
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert len(list(stream)) == len(stream), "the server still serves"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_client_that_stops_reading_pins_bounded_memory_and_starves_no_one(start_server, start_worker, tmp_path, where):
    from tests.helpers import rss_mb

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):  # 1,024 samples of 64x64 float32: batches of 64 are 1 MiB
        rows = rng.random((256, 64 * 64), dtype=np.float32)
        np.save(folder / f"p{i}.npy", np.hstack([rows, np.arange(i * 256, (i + 1) * 256, dtype=np.float32)[:, None]]))
    args = ("--data", str(folder), "--label-column", "-1", "--x-shape", "64,64", "--batch-size", "64")
    if where == "local":
        server = start_server(*args, workers=2)
        builders = server.workers
    else:
        server = start_server(*args, "--worker-bind", "tcp://127.0.0.1:0", workers=0)
        remote = start_worker(server.worker_endpoint, processes=2)
        wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 60, "two remote workers")
        builders = remote.pids

    def memory() -> tuple[float, float]:
        return rss_mb(server.proc.pid), max(rss_mb(p) for p in builders())

    with BatchStream(server.endpoint, timeout=30) as warm:
        assert len(list(warm)) == 16
    server_before, worker_before = memory()

    ctx = zmq.Context.instance()
    slow = ctx.socket(zmq.DEALER)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    try:
        slow.connect(server.endpoint)
        slow.send_multipart(protocol.encode("hello", {"dataset": "train"}))
        assert slow.poll(10_000) and protocol.decode(slow.recv_multipart()).type == "welcome"
        for epoch in range(64):  # 1,024 batches of credit, 1 GiB, that it will never read
            slow.send_multipart(protocol.encode("request", {"epoch": epoch, "batches": list(range(16))}))

        sent = {"count": -1, "since": 0.0}

        def slow_client_stalled() -> bool:
            clients = request_stats(server.endpoint)["clients"]
            count = clients[0]["batches"] if clients else -1
            now = time.monotonic()
            if count != sent["count"]:
                sent.update(count=count, since=now)
            return count > 0 and now - sent["since"] > 2.0

        wait_for(slow_client_stalled, 60, "the server to stop sending to the client that does not read", interval=0.2)
        server_during, worker_during = memory()
        with BatchStream(server.endpoint, timeout=30) as other:
            got = sorted(int(i) for _, y in other for i in y)
        assert got == list(range(1024)), "another client is served a whole epoch meanwhile"
    finally:
        slow.close(0)
    # Without the bound, the server would queue up to the whole credit (1 GiB) for this client.
    # With it: at most half the 32 one-MiB slots, or 16 relayed batches plus what remote workers
    # are building, plus the kernel's socket buffers.
    assert server_during - server_before < 80, f"server RSS grew {server_during - server_before:.0f} MB"
    assert worker_during - worker_before < 80, f"worker RSS grew {worker_during - worker_before:.0f} MB"
