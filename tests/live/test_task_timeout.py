"""A batch whose augment op hangs is bounded by --task-timeout, though its worker still
heartbeats: a local worker is killed by the server, a remote one by its own `npyloader worker`
(the server, which cannot kill it, redoes its batches past its own timeout and drops the late
result), and the batch is redone elsewhere, delivered exactly once and byte-identical to a run
without the hang; one that hangs every time fails after three timeouts, naming its files and
the option to raise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loader_client import BatchStream, ServerError, request_stats
from tests.helpers import (
    PAUSE_OP,
    batch_ids,
    ids_of,
    metrics_url,
    read_epoch,
    scrape,
    value,
    wait_for,
    write_id_dataset,
)

# Each op hangs on the sample whose id (the label column) is `sample`. The `_once` ones hang only
# the first time any process gets there: the marker file is created atomically by the first.
HANG_OPS = '''
import os
import time


def _first(marker):
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def sleep_once(x, y, rng, sample=-1, marker=""):
    """Hangs in C: time.sleep releases the GIL, so the worker's socket thread keeps heartbeating."""
    if int(y) == sample and _first(marker):
        while True:
            time.sleep(60)
    return x, y


def spin_once(x, y, rng, sample=-1, marker=""):
    """Hangs in pure Python, which still lets the socket thread have the GIL between its slices."""
    if int(y) == sample and _first(marker):
        while True:
            pass
    return x, y


def stall_once(x, y, rng, sample=-1, marker="", seconds=0.0):
    """Takes `seconds` the first time, then carries on: a late result, not a dead worker."""
    if int(y) == sample and _first(marker):
        time.sleep(seconds)
    return x, y


def sleep_always(x, y, rng, sample=-1, marker=""):
    if int(y) == sample:
        while True:
            time.sleep(60)
    return x, y
'''

HUNG_SAMPLE = 21  # not 0: the server runs the ops on sample 0 itself at startup
WORKER_BIND = ("--worker-bind", "tcp://127.0.0.1:0")
SERVER_TIMEOUT = re.compile(r"worker (\S+) \(pid \d+ on \S+\) timed out: still building batch (\d+) of epoch 0 "
                            r"of 'train' after ([\d.]+)s \(--task-timeout ([\d.]+)s\)")
HOST_TIMEOUT = re.compile(r"worker process pid \d+ still building batch (\d+) of epoch 0 \(task \d+\) after "
                          r"([\d.]+)s, past --task-timeout ([\d.]+)s: killing it")


def op_args(folder: Path, module: str, op: str, sample: int, marker: Path, *extra: str) -> tuple[str, ...]:
    """A shuffled, noisy dataset (so the bytes depend on every sample's seed) and the hanging op."""
    params = f"sample={sample},marker={marker}" + "".join(f",{p}" for p in extra)
    return ("--data", str(folder), "--label-column", "-1", "--batch-size", "16", "--seed", "7",
            "--augment", "noise:std=0.5", "--augment", f"{module}:{op}:{params}")


def batch_bytes(batches: list[tuple]) -> list[bytes]:
    return [b"".join(a.tobytes() for a in batch) for batch in batches]


def clean_epoch(start_server, folder: Path, module: str, op: str, tmp_path: Path) -> list[bytes]:
    """Epoch 0 as a server serves it whose op never hangs: same files, seed and ops."""
    clean = start_server(*op_args(folder, module, op, -1, tmp_path / "unused"), workers=1)
    expected = batch_bytes(read_epoch(clean.endpoint))
    clean.stop()
    return expected


def hung_batch(batches: list[tuple]) -> int:
    return next(i for i, b in enumerate(batches) if HUNG_SAMPLE in batch_ids(b))


def assert_served_once(got: list[tuple], expected: list[bytes], n: int, stats: dict) -> None:
    """Every sample once, the same bytes as the clean run, and no batch sent twice by the server
    (a client drops a repeat silently, so only the server's count shows one)."""
    assert sorted(ids_of(got)) == list(range(n)), "nothing lost, nothing repeated"
    assert batch_bytes(got) == expected, "byte-identical to the run without the hang"
    assert stats["batches_served"] == len(expected) and stats["failed_batches"] == 0, stats


@pytest.mark.parametrize("op", ["sleep_once", "spin_once"])
def test_a_local_batch_that_hangs_once_is_redone_exactly_once_and_byte_identical(
        start_server, augment_package, id_dataset, tmp_path, op):
    folder, n = id_dataset
    module = augment_package("hangpkg", HANG_OPS)
    expected = clean_epoch(start_server, folder, module, op, tmp_path)
    marker = tmp_path / "hung"
    server = start_server(*op_args(folder, module, op, HUNG_SAMPLE, marker), "--task-timeout", "2", workers=2)
    got = read_epoch(server.endpoint, timeout=60)
    assert marker.exists(), "the op did hang once"
    assert_served_once(got, expected, n, request_stats(server.endpoint))
    found = SERVER_TIMEOUT.search(server.log())
    assert found, server.log()[-3000:]
    assert int(found.group(2)) == hung_batch(got) and found.group(4) == "2"
    assert 2 <= float(found.group(3)) < 2 + 1 + 3, "detected within a heartbeat of the timeout (and some slack)"
    stats = wait_for(lambda: (s := request_stats(server.endpoint))["workers"]["respawns"] >= 1 and s, 30,
                     "the killed worker replaced")
    assert stats["workers"]["timed_out_batches"] == 1 and stats["workers"]["requeued_batches"] >= 1, stats
    wait_for(lambda: len(server.workers()) == 2, 30, "two live workers again")


def test_time_a_batch_waits_behind_another_in_its_worker_is_not_counted(start_server, augment_package, tmp_path):
    """A worker holds two tasks and builds them in turn: the second, given at once, waits one
    batch's time before it starts. Each batch takes about 1.3 s against a 2 s timeout, so timing
    from dispatch would kill the worker on every second batch."""
    module = augment_package("slowpkg", PAUSE_OP)
    n = write_id_dataset(tmp_path / "d", [16] * 4)
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "16",
                          "--augment", f"{module}:pause:seconds=0.08", "--task-timeout", "2", workers=1)
    with BatchStream(server.endpoint, timeout=60, prefetch=4) as stream:
        conn = stream._conn
        conn.request(0, [0, 1, 2, 3])
        wait_for(lambda: [w for w in request_stats(server.endpoint)["workers"]["list"] if w["tasks"] == 2], 30,
                 "the worker holding two tasks")
        got = [conn.get(0, index) for index in range(4)]
    assert sorted(ids_of(got)) == list(range(n))
    stats = request_stats(server.endpoint)
    assert stats["workers"]["timed_out_batches"] == 0 and stats["workers"]["respawns"] == 0, stats


@pytest.mark.slow
def test_a_batch_that_hangs_every_time_fails_after_three_timeouts_naming_its_files_and_the_option(
        start_server, augment_package, tmp_path):
    module = augment_package("hangpkg", HANG_OPS)
    n = write_id_dataset(tmp_path / "d", [16, 16, 16])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "8", "--no-shuffle",
                          "--augment", f"{module}:sleep_always:sample={HUNG_SAMPLE}", "--task-timeout", "2",
                          "--metrics-port", "0", "--metrics-host", "127.0.0.1", workers=2)
    got: list[int] = []
    with BatchStream(server.endpoint, timeout=60) as stream:
        conn = stream._conn
        conn.request(0, list(range(6)))
        for index in range(6):
            if index == 2:
                with pytest.raises(ServerError) as failed:
                    conn.get(0, index)
            else:
                got += batch_ids(conn.get(0, index))
    assert re.search(r"batch 2 of epoch 0 of 'train' was lost by 3 workers in a row \(last: worker \S+ timed out: "
                     r"still building batch 2 of epoch 0 of 'train' after [\d.]+s \(--task-timeout 2s\)\); .*hang.*"
                     r"raise --task-timeout .*part-001\.npy", str(failed.value)), str(failed.value)
    assert sorted(got) == sorted(set(range(n)) - set(range(16, 24))), "every other batch exactly once"
    stats = request_stats(server.endpoint)
    assert stats["workers"]["timed_out_batches"] == 3 and stats["failed_batches"] == 1, stats
    assert len(SERVER_TIMEOUT.findall(server.log())) == 3
    wait_for(lambda: value(scrape(metrics_url(server.log())), "npyloader_timed_out_batches_total") == 3, 10,
             "three timeouts in the metrics")
    wait_for(lambda: len(server.workers()) == 2, 30, "two live workers again")


def test_a_remote_worker_hanging_once_is_killed_by_its_host_and_the_epoch_completes_exactly_once(
        start_server, start_worker, augment_package, id_dataset, tmp_path):
    """The server, whose own timeout is the default, hears no more from the killed process and
    redoes the batch; `npyloader worker` starts another process."""
    folder, n = id_dataset
    module = augment_package("hangpkg", HANG_OPS)
    expected = clean_epoch(start_server, folder, module, "sleep_once", tmp_path)
    marker = tmp_path / "hung"
    server = start_server(*op_args(folder, module, "sleep_once", HUNG_SAMPLE, marker), *WORKER_BIND,
                          "--heartbeat", "0.5", workers=0)
    worker = start_worker(server.worker_endpoint, "--task-timeout", "2", "--heartbeat", "0.5",
                          "--metrics-port", "0", "--metrics-host", "127.0.0.1", processes=2)
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 60, "two remote workers")
    got = read_epoch(server.endpoint, timeout=60)
    assert marker.exists(), "the op did hang once"
    stats = request_stats(server.endpoint)
    assert_served_once(got, expected, n, stats)
    assert stats["workers"]["timed_out_batches"] == 0 and stats["workers"]["requeued_batches"] >= 1, stats
    found = HOST_TIMEOUT.search(worker.log())
    assert found, worker.log()[-3000:]
    assert int(found.group(1)) == hung_batch(got) and found.group(3) == "2" and 2 <= float(found.group(2)) < 4
    assert value(scrape(metrics_url(worker.log())), "npyloader_remote_timed_out_batches_total") == 1
    wait_for(lambda: len(worker.pids()) == 2, 30, "the worker command to replace its killed process")


def test_a_remote_batch_past_the_servers_timeout_is_redone_and_its_late_result_dropped(
        start_server, start_worker, augment_package, id_dataset, tmp_path):
    """The worker host's own timeout is the default, so the slow process lives on and, once done,
    sends the batch that was redone meanwhile: the server drops it, and gives that process no
    new batch while it is busy with the old ones (else those would time out too)."""
    folder, n = id_dataset
    module = augment_package("hangpkg", HANG_OPS)
    expected = clean_epoch(start_server, folder, module, "stall_once", tmp_path)
    server = start_server(*op_args(folder, module, "stall_once", HUNG_SAMPLE, tmp_path / "hung", "seconds=10"),
                          *WORKER_BIND, "--task-timeout", "1.5", "--heartbeat", "0.5", workers=0)
    worker = start_worker(server.worker_endpoint, "--heartbeat", "0.5", processes=2)
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 60, "two remote workers")
    got = read_epoch(server.endpoint, timeout=60)
    assert "dropped its result" not in server.log(), "redone by the other process, not waited for"
    wait_for(lambda: "after it was redone elsewhere; dropped its result" in server.log(), 30,
             "the late result to arrive and be dropped")
    stats = request_stats(server.endpoint)
    assert_served_once(got, expected, n, stats)
    assert stats["workers"]["timed_out_batches"] == 1, stats
    found = SERVER_TIMEOUT.search(server.log())
    assert found and int(found.group(2)) == hung_batch(got), server.log()[-3000:]
    assert "killing it" not in worker.log() and stats["workers"]["ready"] == 2, "the slow process was left alone"
