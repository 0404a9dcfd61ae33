"""Workers that join over tcp: late joins, kills, stops, refusals, restarts, CURVE."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from loader_client import BatchStream, request_stats
from loader_client.security import ClientCurve
from tests.helpers import (
    free_port,
    ids_of,
    read_epoch,
    serve_command,
    wait_for,
    write_id_dataset,
)

WORKER_BIND = ("--worker-bind", "tcp://127.0.0.1:0")


def remote_workers(url: str, **kw) -> list[dict]:
    return [w for w in request_stats(url, **kw)["workers"]["list"] if not w["local"]]


def wait_remote(url: str, count: int, **kw) -> list[dict]:
    return wait_for(lambda: len(ws := remote_workers(url, **kw)) >= count and ws, 60, f"{count} remote worker(s)")


def slow_images(folder: Path, count: int = 480) -> tuple[str, ...]:
    """Enough cubic rotation per batch that an epoch takes a while with one or two workers."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        rows = rng.random((count // 4, 48 * 48), dtype=np.float32)
        ids = np.arange(i * count // 4, (i + 1) * count // 4, dtype=np.float32)[:, None]
        np.save(folder / f"p{i}.npy", np.hstack([rows, ids]))
    return ("--data", str(folder), "--label-column", "-1", "--x-shape", "48,48", "--batch-size", "8",
            "--augment", "rotate:degrees=30,p=1,order=3")


def test_remote_workers_alone_serve_the_same_bytes_as_local_ones(start_server, start_worker, tmp_path):
    args = slow_images(tmp_path / "imgs", count=160)
    local = start_server(*args, workers=1)
    expected = read_epoch(local.endpoint)
    local.stop()

    server = start_server(*args, *WORKER_BIND, workers=0)
    assert server.worker_endpoint.startswith("tcp://127.0.0.1:")
    start_worker(server.worker_endpoint, processes=2)
    wait_remote(server.endpoint, 2)
    got = read_epoch(server.endpoint)
    assert [b[0].tobytes() for b in got] == [b[0].tobytes() for b in expected]
    assert sorted(ids_of(got)) == list(range(160))
    workers = remote_workers(server.endpoint)
    assert sum(w["batches"] for w in workers) == 20
    for w in workers:
        assert w["host"] == socket.gethostname() and w["pid"] > 0
        assert {"batches_per_s", "busy_pct", "last_heartbeat_s"} <= set(w)


def test_late_joining_worker_takes_work_mid_epoch(start_server, start_worker, tmp_path):
    server = start_server(*slow_images(tmp_path / "imgs"), *WORKER_BIND, workers=1)
    with BatchStream(server.endpoint, timeout=60, prefetch=8) as stream:
        batches = iter(stream)
        got = [tuple(a.copy() for a in next(batches)) for _ in range(5)]
        start_worker(server.worker_endpoint)
        wait_remote(server.endpoint, 1)
        got.extend(tuple(a.copy() for a in b) for b in batches)
    assert sorted(ids_of(got)) == list(range(480))
    assert remote_workers(server.endpoint)[0]["batches"] > 0, "the late worker did some of the epoch"


@pytest.mark.slow
def test_killed_remote_worker_loses_no_batch(start_server, start_worker, tmp_path):
    server = start_server(*slow_images(tmp_path / "imgs"), *WORKER_BIND, "--heartbeat", "0.3", workers=0)
    worker = start_worker(server.worker_endpoint, processes=2)
    wait_remote(server.endpoint, 2)
    with BatchStream(server.endpoint, timeout=60, prefetch=12) as stream:
        batches = iter(stream)
        got = [tuple(a.copy() for a in next(batches))]
        busy = wait_for(lambda: [w for w in remote_workers(server.endpoint) if w["tasks"]], 20, "a busy worker")
        os.kill(busy[0]["pid"], signal.SIGKILL)
        got.extend(tuple(a.copy() for a in b) for b in batches)
    assert len(got) == 60 and sorted(ids_of(got)) == list(range(480))
    stats = request_stats(server.endpoint)
    assert stats["workers"]["requeued_batches"] >= 1 and stats["failed_batches"] == 0, stats
    wait_for(lambda: len(worker.pids()) == 2, 20, "the worker command to replace its killed process")


@pytest.mark.slow
def test_stopped_worker_is_replaced_then_rejoins_when_continued(start_server, start_worker, tmp_path):
    server = start_server(*slow_images(tmp_path / "imgs"), *WORKER_BIND, "--heartbeat", "0.3", workers=0)
    start_worker(server.worker_endpoint, "--heartbeat", "0.3", processes=2)
    wait_remote(server.endpoint, 2)
    with BatchStream(server.endpoint, timeout=60, prefetch=12) as stream:
        batches = iter(stream)
        got = [tuple(a.copy() for a in next(batches))]
        busy = wait_for(lambda: [w for w in remote_workers(server.endpoint) if w["tasks"]], 20, "a busy worker")
        stopped = busy[0]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            got.extend(tuple(a.copy() for a in b) for b in batches)
            assert stopped not in [w["pid"] for w in remote_workers(server.endpoint)]
        finally:
            os.kill(stopped, signal.SIGCONT)
    assert sorted(ids_of(got)) == list(range(480)), "exactly once despite the stopped worker"
    stats = request_stats(server.endpoint)
    assert stats["workers"]["requeued_batches"] >= 1 and stats["failed_batches"] == 0, stats
    wait_for(lambda: stopped in [w["pid"] for w in remote_workers(server.endpoint)], 30,
             "the continued worker to rejoin by itself")


def test_worker_with_different_data_is_refused_naming_the_file(start_server, start_worker, tmp_path):
    write_id_dataset(tmp_path / "server" / "ids", [30, 20, 25])
    shutil.copytree(tmp_path / "server", tmp_path / "other")
    np.save(tmp_path / "other" / "ids" / "part-001.npy", np.zeros((21, 17), np.float32))
    server = start_server("--data", str(tmp_path / "server" / "ids"), "--label-column", "-1", *WORKER_BIND, workers=1)
    worker = start_worker(server.worker_endpoint, "--data-root", str(tmp_path / "other" / "ids"))
    assert worker.proc.wait(60) == 2
    assert "part-001.npy" in worker.log() and "differs" in worker.log()
    wait_for(lambda: "part-001.npy" in server.log(), 10, "the server to log the refusal")
    assert remote_workers(server.endpoint) == []


def test_data_root_maps_the_servers_paths_to_this_hosts_copy(start_server, start_worker, tmp_path):
    n = write_id_dataset(tmp_path / "server" / "ids", [30, 20, 25])
    shutil.copytree(tmp_path / "server", tmp_path / "mirror")
    server = start_server("--data", str(tmp_path / "server" / "ids"), "--label-column", "-1", "--batch-size", "10",
                          *WORKER_BIND, workers=0)
    shutil.rmtree(tmp_path / "server")  # with --workers 0 only the worker reads data from here on
    assert f"data root {tmp_path / 'server' / 'ids'}" in server.log()
    start_worker(server.worker_endpoint, "--data-root", str(tmp_path / "mirror" / "ids"))
    wait_remote(server.endpoint, 1)
    assert sorted(ids_of(read_epoch(server.endpoint))) == list(range(n))


@pytest.mark.slow
def test_worker_rejoins_a_restarted_server_by_itself(start_server, start_worker, id_dataset):
    folder, n = id_dataset
    client_port, worker_port = free_port(), free_port()
    args = ("--data", str(folder), "--label-column", "-1", "--batch-size", "16", "--heartbeat", "0.3",
            "--bind", f"tcp://127.0.0.1:{client_port}", "--worker-bind", f"tcp://127.0.0.1:{worker_port}")
    first = start_server(*args, workers=0)
    start_worker(first.worker_endpoint, "--heartbeat", "0.3")
    wait_remote(first.endpoint, 1)
    first.stop()
    second = start_server(*args, workers=0)
    wait_remote(second.endpoint, 1)
    assert sorted(ids_of(read_epoch(second.endpoint))) == list(range(n))


def test_plain_tcp_beyond_loopback_warns(start_server, id_dataset):
    folder, _ = id_dataset
    port = free_port()
    server = start_server("--data", str(folder), "--label-column", "-1", "--bind", f"tcp://0.0.0.0:{port}",
                          *WORKER_BIND)
    assert "accepts plain, unauthenticated tcp" in server.log()
    assert f"tcp://0.0.0.0:{port}" in server.log()


def keys(tmp_path: Path, *names: str) -> dict[str, Path]:
    for name in names:
        subprocess.run(serve_command("keygen", str(tmp_path / "keys"), "--name", name), check=True,
                       capture_output=True, timeout=60)
    return {name: tmp_path / "keys" / f"{name}.key" for name in names}


def test_curve_admits_listed_peers_and_refuses_strangers(start_server, start_worker, tmp_path, id_dataset):
    folder, n = id_dataset
    public = keys(tmp_path, "server", "trainer", "worker", "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in ("trainer", "worker"):
        shutil.copy(public[name], authorized)
    secret = {name: Path(f"{p}_secret") for name, p in public.items()}
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          "--curve-secret-key", str(secret["server"]), "--authorized-keys", str(authorized),
                          *WORKER_BIND, workers=0)
    start_worker(server.worker_endpoint, "--curve-secret-key", str(secret["worker"]),
                 "--curve-server-key", str(public["server"]))
    trainer = ClientCurve.from_files(secret["trainer"], public["server"])
    wait_remote(server.endpoint, 1, curve=trainer)
    assert sorted(ids_of(read_epoch(server.endpoint, curve=trainer))) == list(range(n))

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=server.endpoint):
        BatchStream(server.endpoint, timeout=2, curve=(secret["stranger"], public["server"]))
    with pytest.raises(TimeoutError):
        BatchStream(server.endpoint, timeout=2)
    assert time.monotonic() - started < 15
    wait_for(lambda: "refused a peer with CURVE key" in server.log(), 10, "the refusal to be logged")


def test_a_curve_server_runs_local_workers_too(start_server, tmp_path, id_dataset):
    """CURVE guards the tcp endpoints; local workers use their own ipc socket in a folder only
    this user can enter, so they need no keys."""
    folder, n = id_dataset
    public = keys(tmp_path, "server", "trainer")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(public["trainer"], authorized)
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16",
                          "--curve-secret-key", f"{public['server']}_secret", "--authorized-keys", str(authorized),
                          *WORKER_BIND, workers=2)
    trainer = ClientCurve.from_files(f"{public['trainer']}_secret", public["server"])
    wait_for(lambda: request_stats(server.endpoint, curve=trainer)["workers"]["ready"] == 2, 30, "two local workers")
    assert sorted(ids_of(read_epoch(server.endpoint, curve=trainer))) == list(range(n))


def test_remote_only_server_stops_cleanly_and_leaves_no_ipc_folder(start_server, id_dataset, tmp_path):
    """The server makes its ipc folder in its TMPDIR (tempfile.gettempdir(), not always /tmp);
    a private one shows the folder while it runs and that it is gone after, whatever other
    servers on the machine do in /tmp meanwhile."""
    folder, _ = id_dataset
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    server = start_server("--data", str(folder), "--label-column", "-1", *WORKER_BIND, workers=0,
                          env={"TMPDIR": str(private_tmp)})
    assert [p.name.startswith("npyloader-") for p in private_tmp.iterdir()] == [True], "its ipc folder is here"
    assert server.stop() == 0
    assert "Traceback" not in server.log()
    assert list(private_tmp.iterdir()) == [], "no ipc folder left behind"
