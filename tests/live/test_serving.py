"""End to end through real `npyloader serve` processes: layouts, exactly-once, determinism, faults."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loader_client import BatchStream, request_stats
from tests.helpers import (
    PAUSE_OP,
    batch_ids,
    ids_of,
    pid_alive,
    read_epoch,
    run_bounded,
    serve_command,
    wait_for,
    write_id_dataset,
)


def test_combined_layout_serves_every_sample_exactly_once_per_epoch(start_server, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder / "*.npy"), "--label-column", "-1", "--batch-size", "16")
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert len(stream) == 13
        orders = []
        for _ in range(2):
            ids = []
            for x, y in stream:
                assert x.shape[1:] == (16,) and x.dtype == np.float32
                np.testing.assert_array_equal(x[:, 0], (y * 1000) % 9973)
                ids.extend(y.astype(int).tolist())
            assert sorted(ids) == list(range(n))
            orders.append(ids)
        assert orders[0] != orders[1], "each epoch is a fresh per-sample permutation"
        assert stream.stats()["batches"] == 26


def test_label_column_and_x_shape_reshape_rows(start_server, tmp_path):
    rows = np.arange(10 * 17, dtype=np.float32).reshape(10, 17)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "a.npy", rows)
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "0", "--x-shape", "4,4",
                          "--batch-size", "4", "--no-shuffle")
    batches = read_epoch(server.endpoint)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(x, rows[:, 1:].reshape(10, 4, 4))
    np.testing.assert_array_equal(y, rows[:, 0])
    assert [len(b[0]) for b in batches] == [4, 4, 2]


def test_paired_images_and_masks_get_identical_geometric_augmentation(start_server, tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("a", 20), ("b", 13)):
        images = rng.random((count, 12, 12), dtype=np.float32)
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "mask").mkdir(exist_ok=True)
        np.save(tmp_path / "img" / f"{name}.npy", images)
        np.save(tmp_path / "mask" / f"{name}.npy", (images > 0.5).astype(np.uint8))
    server = start_server("--data", str(tmp_path / "img" / "*.npy"), "--layout", "paired",
                          "--targets", str(tmp_path / "mask" / "*.npy"), "--batch-size", "8",
                          "--augment", "flip:axis=1,p=0.5", "--augment", "flip:axis=0,p=0.5",
                          "--augment", "shift:pixels=3")
    batches = read_epoch(server.endpoint)
    x = np.concatenate([b[0] for b in batches])
    masks = np.concatenate([b[1] for b in batches])
    assert x.shape == (33, 12, 12) and masks.dtype == np.uint8
    inside = x > 0  # shift pads with zeros; the mask pads with 0 (background) too
    np.testing.assert_array_equal(masks[inside], (x[inside] > 0.5).astype(np.uint8))


def test_per_sample_layout_with_a_labels_file(start_server, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(11):
        np.save(scans / f"scan-{i:02d}.npy", np.full((5, 6), i, dtype=np.int16))
    np.save(tmp_path / "labels.npy", np.arange(11) * 10)
    server = start_server("--data", str(scans), "--layout", "per-sample", "--labels", str(tmp_path / "labels.npy"),
                          "--batch-size", "4")
    batches = read_epoch(server.endpoint)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (11, 5, 6) and x.dtype == np.int16
    np.testing.assert_array_equal(y, x[:, 0, 0] * 10)
    assert sorted(y.tolist()) == list(range(0, 110, 10))


def test_per_sample_layout_with_target_files(start_server, tmp_path):
    for sub in ("in", "out"):
        (tmp_path / sub).mkdir()
    for i in range(7):
        np.save(tmp_path / "in" / f"s{i}.npy", np.full((3, 3), i, dtype=np.float32))
        np.save(tmp_path / "out" / f"s{i}.npy", np.full((3, 3), -i, dtype=np.float32))
    server = start_server("--data", str(tmp_path / "in" / "*.npy"), "--layout", "per-sample",
                          "--targets", str(tmp_path / "out" / "*.npy"), "--batch-size", "3")
    batches = read_epoch(server.endpoint)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(y, -x)
    assert sorted(x[:, 0, 0].tolist()) == list(range(7))


def test_npz_members_by_name(start_server, tmp_path):
    (tmp_path / "z").mkdir()
    for i, n in enumerate((9, 6)):
        ids = np.arange(n) + 100 * i
        np.savez(tmp_path / "z" / f"part{i}.npz", images=np.repeat(ids, 4).reshape(n, 2, 2).astype(np.float32),
                 labels=ids.astype(np.int64))
    server = start_server("--data", str(tmp_path / "z" / "*.npz"), "--layout", "paired",
                          "--x-key", "images", "--y-key", "labels", "--batch-size", "5")
    batches = read_epoch(server.endpoint)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(x[:, 0, 0], y)
    assert sorted(y.tolist()) == list(range(9)) + list(range(100, 106))


def augmented_images(folder: Path, count: int = 96, size: int = 24) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        rows = rng.random((count // 3, size * size), dtype=np.float32)
        labels = np.arange(i * (count // 3), (i + 1) * (count // 3), dtype=np.float32)[:, None]
        np.save(folder / f"p{i}.npy", np.hstack([rows, labels]))


AUGMENT = ("--augment", "rotate:degrees=20,p=0.7", "--augment", "noise:std=0.1,p=0.5",
           "--augment", "crop:height=20,width=20")


def test_batches_are_byte_identical_with_one_and_three_workers(start_server, tmp_path):
    augmented_images(tmp_path / "imgs")
    args = ("--data", str(tmp_path / "imgs"), "--label-column", "-1", "--x-shape", "24,24",
            "--batch-size", "10", *AUGMENT)
    epochs = {}
    for workers in (1, 3):
        server = start_server(*args, workers=workers)
        epochs[workers] = [read_epoch(server.endpoint, epoch=e) for e in (0, 1)]
        server.stop()
    for e in (0, 1):
        assert len(epochs[1][e]) == len(epochs[3][e]) == 10
        for one, three in zip(epochs[1][e], epochs[3][e]):
            assert one[0].shape[1:] == (20, 20)
            assert one[0].tobytes() == three[0].tobytes() and one[1].tobytes() == three[1].tobytes()
    assert epochs[1][0][0][0].tobytes() != epochs[1][1][0][0].tobytes(), "augmentation differs across epochs"


@pytest.mark.slow
def test_killed_worker_loses_no_batch(start_server, tmp_path):
    augmented_images(tmp_path / "imgs", count=600, size=48)
    args = ("--data", str(tmp_path / "imgs"), "--label-column", "-1", "--x-shape", "48,48",
            "--batch-size", "8", "--augment", "rotate:degrees=30,p=1,order=3")
    reference = start_server(*args, workers=1)
    expected = read_epoch(reference.endpoint)
    reference.stop()

    server = start_server(*args, workers=2)
    got = []
    with BatchStream(server.endpoint, timeout=60, prefetch=16) as stream:
        batches = iter(stream)
        got.append(tuple(a.copy() for a in next(batches)))
        busy = wait_for(lambda: [w for w in request_stats(server.endpoint)["workers"]["list"] if w["tasks"]],
                        10, "a worker with a batch in progress")
        os.kill(busy[0]["pid"], signal.SIGKILL)
        got.extend(tuple(a.copy() for a in b) for b in batches)
    stats = wait_for(lambda: (s := request_stats(server.endpoint))["workers"]["respawns"] >= 1 and s, 20,
                     "the killed worker to be respawned")
    assert stats["workers"]["requeued_batches"] >= 1 and stats["failed_batches"] == 0, stats
    assert len(got) == len(expected) == 75
    assert sorted(ids_of(got)) == list(range(600))
    for mine, ref in zip(got, expected):
        assert mine[0].tobytes() == ref[0].tobytes()
    wait_for(lambda: len(server.workers()) == 2, 20, "two live workers again")


def test_custom_op_loaded_by_import_path(start_server, augment_package, id_dataset):
    module = augment_package("userpkg", "def offset(x, y, rng, amount=1.0):\n    return x + amount + rng.random(), y\n")
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "50",
                          "--augment", f"{module}:offset:amount=1000")
    batches = read_epoch(server.endpoint)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    base = (y * 1000) % 9973
    assert np.all(x[:, 0] - base >= 1000) and np.all(x[:, 0] - base < 1001)


def test_shards_give_each_trainer_a_disjoint_slice(start_server, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16")
    parts = [ids_of(read_epoch(server.endpoint, shard=(rank, 3))) for rank in range(3)]
    assert sorted(sum(parts, [])) == list(range(n))
    assert all(len(set(a) & set(b)) == 0 for a in parts for b in parts if a is not b)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_endpoint_serves_like_any_other(start_server, id_dataset):
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          bind="tcp://[::1]:0", workers=1)
    assert re.fullmatch(r"tcp://\[::1\]:\d+", server.endpoint), server.endpoint
    assert sorted(ids_of(read_epoch(server.endpoint, transport="socket"))) == list(range(n))
    assert request_stats(server.endpoint)["datasets"]["train"]["batches_served"] == 13


def test_several_clients_share_the_pool_at_once(start_server, tmp_path):
    write_id_dataset(tmp_path / "train", [120, 80])
    write_id_dataset(tmp_path / "val", [40])
    (tmp_path / "loader.toml").write_text(
        '[datasets.train]\ndata = "train/*.npy"\nlabel_column = -1\nbatch_size = 8\n'
        '[datasets.val]\ndata = ["val"]\nlabel-column = -1\nbatch_size = 8\nno-shuffle = true\n')
    server = start_server("--config", str(tmp_path / "loader.toml"))
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    # every client has said hello before any reads, so the server holds all three sessions at once
    connected, go = threading.Barrier(4), threading.Event()

    def consume(name: str, dataset: str, shard=None) -> None:
        try:
            with BatchStream(server.endpoint, dataset=dataset, shard=shard, timeout=60) as stream:
                connected.wait(60)
                assert go.wait(60), "the test never let the clients read"
                results[name] = [i for batch in stream for i in batch_ids(batch)]
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)
            connected.abort()

    threads = [threading.Thread(target=consume, args=args) for args in
               (("train-a", "train", (0, 2)), ("train-b", "train", (1, 2)), ("val", "val"))]
    for t in threads:
        t.start()
    try:
        connected.wait(60)
        sessions = sorted(c["dataset"] for c in request_stats(server.endpoint)["clients"])
    except threading.BrokenBarrierError:
        sessions = []
    finally:
        go.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert sessions == ["train", "train", "val"], "the server holds the three clients' sessions at once"
    assert sorted(results["train-a"] + results["train-b"]) == list(range(200))
    assert results["val"] == list(range(40)), "no-shuffle keeps file order"


def test_stats_command_reports_datasets_workers_and_clients(start_server, id_dataset):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16")
    with BatchStream(server.endpoint, timeout=30) as stream:
        list(stream)
        out = run_bounded(serve_command("stats", server.endpoint, "--json"), timeout=60)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        train = stats["datasets"]["train"]
        assert {k: train[k] for k in ("samples", "batches", "batch_size", "batches_served", "batches_built",
                                      "queued", "outstanding")} == {
            "samples": 203, "batches": 13, "batch_size": 16, "batches_served": 13, "batches_built": 13,
            "queued": 0, "outstanding": 0}
        assert train["latency_s"]["count"] == 13 and train["worker_read_s"] > 0 and train["worker_augment_s"] == 0
        assert stats["workers"]["alive"] == 2 and stats["batches_served"] == 13
        assert stats["clients"][0]["batches"] == 13
        text = run_bounded(serve_command("stats", server.endpoint), timeout=60).stdout
        assert "workers 2 alive" in text and re.search(r"^train\s+203\s+13\s+16\s", text, re.M) and "WAIT TOTAL" in text
        assert re.search(r"^local-\d+\s+local\s", text, re.M) and "BUSY" in text and "HEARTBEAT" in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_and_workers_within_seconds(start_server, id_dataset, sig):
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", workers=3)
    workers = server.workers()
    assert len(workers) == 3
    started = time.monotonic()
    assert server.stop(sig, timeout=10) == 0
    assert time.monotonic() - started < 10
    assert not any(pid_alive(pid) for pid in workers)
    assert "stopping" in server.log()


def test_client_and_server_import_no_tensorflow_torch_or_jax():
    code = ("import sys, loader_client, loader_server.serve.server, loader_server.cli, loader_server.worker.loop;"
            "import loader_client.diagnose, loader_client.rates, loader_server.tools.watch;"
            "from loader_client import BatchStream;"
            "assert 'DataWaitMonitor' in loader_client.__all__;"
            "bad = [m for m in ('tensorflow', 'keras', 'torch', 'jax') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_stopped_local_worker_is_killed_replaced_and_its_batches_redone(start_server, tmp_path):
    augmented_images(tmp_path / "imgs", count=600, size=48)
    server = start_server("--data", str(tmp_path / "imgs"), "--label-column", "-1", "--x-shape", "48,48",
                          "--batch-size", "8", "--augment", "rotate:degrees=30,p=1,order=3", "--heartbeat", "0.3",
                          workers=2)
    with BatchStream(server.endpoint, timeout=60, prefetch=16) as stream:
        batches = iter(stream)
        got = [tuple(a.copy() for a in next(batches))]
        busy = wait_for(lambda: [w for w in request_stats(server.endpoint)["workers"]["list"] if w["tasks"]],
                        10, "a worker with a batch in progress")
        stopped = busy[0]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        got.extend(tuple(a.copy() for a in b) for b in batches)
    assert sorted(ids_of(got)) == list(range(600))
    wait_for(lambda: not pid_alive(stopped), 20, "the stopped worker to be killed (its slots are reused)")
    stats = request_stats(server.endpoint)
    assert stats["workers"]["requeued_batches"] >= 1 and stats["workers"]["respawns"] >= 1, stats
    assert stats["failed_batches"] == 0, stats


def test_wait_counts_an_epochs_tail_when_fewer_batches_than_loader_threads_remain(start_server, tmp_path,
                                                                                    augment_package):
    """Keras runs `workers` loader threads; at an epoch's end fewer have a batch left to fetch,
    and training is starved as soon as all of those are blocked."""
    module = augment_package("slowpkg", PAUSE_OP)
    write_id_dataset(tmp_path / "d", [16])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "8",
                          "--augment", f"{module}:pause:seconds=0.05", workers=1)
    with BatchStream(server.endpoint, timeout=30) as stream:
        conn = stream._conn
        conn.callers = 4  # as RemoteSequence sets it for Keras's four loader threads
        threads = [threading.Thread(target=conn.get, args=(0, i)) for i in range(2)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.perf_counter() - started
    # Both batches (8 samples x 50 ms each, one worker) take about 0.8 s; both threads were
    # blocked nearly all that time, and only two of the four could be fetching at all.
    assert 0.5 * elapsed < stream.stats()["wait_s"] <= elapsed


def test_drop_remainder_serves_only_full_batches_a_different_remainder_each_epoch(start_server, id_dataset):
    """--drop-remainder: 203 samples in batches of 16 are 12 full batches a client can count on;
    the 11 left over are dropped, and since the order is per sample, not the same 11 each epoch."""
    folder, n = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16", "--drop-remainder",
                          workers=1)
    dropped = []
    with BatchStream(server.endpoint, timeout=60) as stream:
        assert len(stream) == 12
        for _ in range(2):
            sizes, ids = [], []
            for batch in stream:
                sizes.append(len(batch[1]))
                ids += batch_ids(batch)
            assert sizes == [16] * 12
            assert len(ids) == len(set(ids)) == 192 and set(ids) <= set(range(n))
            dropped.append(set(range(n)) - set(ids))
    assert dropped[0] != dropped[1], "each epoch drops the tail of its own permutation"


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_received_arrays_are_read_only_views_on_the_received_frames(start_server, id_dataset, transport):
    """README: arrays are read-only views, no copy: over the socket on the received message, on
    the server's host on its shared memory. Each array must refuse writes, and its chain of bases
    must end at the ZeroMQ frame's buffer, or at the read-only map of the server's segment, with
    no array that owns its data (a copy) on the way."""
    import mmap

    import zmq

    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16", workers=1)
    with BatchStream(server.endpoint, timeout=60, transport=transport) as stream:
        for batch in stream:
            for array in batch:
                assert not array.flags.writeable, "a received array accepts writes"
                with pytest.raises(ValueError, match="read-only"):
                    array[...] = 0
                base = array
                while isinstance(base, np.ndarray) or (isinstance(base, memoryview) and isinstance(base.obj, np.ndarray)):
                    base = base.obj if isinstance(base, memoryview) else base
                    assert not base.flags.owndata, "a copy sits between the array and the message"
                    base = base.base
                source = zmq.Frame if transport == "socket" else mmap.mmap
                assert isinstance(base, memoryview) and isinstance(base.obj, source), (type(base), base)
                assert base.readonly


def test_seed_picks_order_and_augmentation_and_the_same_seed_gives_the_same_bytes(start_server, tmp_path):
    """Every other test serves the default seed. Here: seeds 1 and 2 give different sample orders
    and different augmentation of the same sample, and seed 1 again, on a fresh server, gives the
    first epoch byte for byte."""
    augmented_images(tmp_path / "imgs")
    args = ("--data", str(tmp_path / "imgs"), "--label-column", "-1", "--x-shape", "24,24", "--batch-size", "10",
            "--augment", "noise:std=0.1,p=1")
    epochs = []
    for seed in (1, 2, 1):
        server = start_server(*args, "--seed", str(seed), workers=1)
        epochs.append(read_epoch(server.endpoint))
        server.stop()
    first, other, again = epochs
    assert sorted(ids_of(first)) == sorted(ids_of(other)) == list(range(96))
    assert ids_of(first) != ids_of(other), "another seed, another order"
    rows = [dict(zip(ids_of(e), np.concatenate([b[0] for b in e]))) for e in (first, other)]
    assert all(not np.array_equal(rows[0][i], rows[1][i]) for i in range(96)), "another seed, other noise"
    assert ids_of(again) == ids_of(first)
    assert [b[0].tobytes() for b in again] == [b[0].tobytes() for b in first], "the same seed, the same bytes"


def test_two_clients_asking_at_once_take_turns_and_neither_starves(start_server, tmp_path, augment_package):
    """The broker gives workers to clients in turn. With one slow worker, a client that asks for a
    whole epoch first must not have all of it built before a second client, asking just after, gets
    a share: when either has its 16 batches, the other has at least half of its own. Served first
    come, first served, the second would have at most the one batch in flight."""
    from loader_client.stream import Connection

    module = augment_package("slowpkg", PAUSE_OP)
    n = write_id_dataset(tmp_path / "d", [32, 32, 32, 32])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "8",
                          "--augment", f"{module}:pause:seconds=0.03", workers=1)
    first = Connection(server.endpoint, timeout=60)
    second = None
    try:
        second = Connection(server.endpoint, timeout=60)
        everything = list(range(16))
        first.request(0, everything)
        wait_for(lambda: any(c["batches"] + c["outstanding"] == 16 for c in request_stats(server.endpoint)["clients"]),
                 20, "the server to hold the first client's request")
        second.request(0, everything)
        finished = wait_for(lambda: [c for c in (first, second) if c.batches == 16], 120, "either client's epoch")
        other = second if finished[0] is first else first
        share = other.batches
        assert share >= 8, f"the other client had {share} of its 16 batches"
        for conn in (first, second):
            assert sorted(i for index in everything for i in batch_ids(conn.get(0, index))) == list(range(n))
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_two_callers_waiting_for_one_batch_both_get_it(start_server, id_dataset, transport):
    """Keras abandons the loader threads of the pass that reads a few batches to learn their
    shapes, and the pass that follows asks for the same batches: whichever caller takes a batch
    first, the other must get it too (asked again), not wait out its timeout."""
    import threading

    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16", workers=1)
    with BatchStream(server.endpoint, timeout=20, transport=transport) as stream:
        conn = stream._conn
        got: list[list[int]] = []
        callers = [threading.Thread(target=lambda: got.append(batch_ids(conn.get(0, 5)))) for _ in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert len(got) == 2 and got[0] == got[1] and len(got[0]) == 16
