"""Same-host delivery through shared memory, with real servers and real client processes.

What is proven here: a client on the server's host reads batches from the slots (and one that
cannot see them, or is another user, falls back to the socket and says why); both transports
give the same bytes, each batch exactly once; slots are never reused under a live reader, are
reclaimed from a killed client only after --client-timeout, and a slow client pins a bounded
number; a forged release or nonce is refused without harming anyone else.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from loader_client import BatchStream, protocol, request_stats
from loader_client.shm import HEADER, SHM_DIR
from tests.helpers import run_bounded, wait_for, write_id_dataset

BATCH = 16


def ids_server(start_server, folder: Path, *extra: str, workers: int = 2):
    return start_server("--data", str(folder), "--label-column", "-1", "--batch-size", str(BATCH), *extra,
                        workers=workers)


def epoch_by_id(stream: BatchStream) -> dict[int, np.ndarray]:
    """One epoch as {sample id: features}, failing on any sample seen twice."""
    seen: dict[int, np.ndarray] = {}
    for x, y in stream:
        for row, sample in zip(x, y.astype(int)):
            assert sample not in seen, f"sample {sample} delivered twice in one epoch"
            seen[sample] = np.array(row)
    return seen


def run_client(script: str, *args: str, prefix: tuple[str, ...] = (), timeout: float = 120) -> dict:
    """Run a client in its own process (its own mount namespace or user where `prefix` or the
    script says so); it prints one JSON line, which is returned."""
    proc = run_bounded([*prefix, sys.executable, "-c", textwrap.dedent(script), *args], timeout=timeout,
                       cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_same_host_client_reads_shared_memory_and_both_transports_give_the_same_bytes(start_server, id_dataset):
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    with BatchStream(server.endpoint, transport="auto") as shm, BatchStream(server.endpoint, transport="socket") as sock:
        for _ in range(2):
            over_shm, over_socket = epoch_by_id(shm), epoch_by_id(sock)
            assert sorted(over_shm) == list(range(n)), "every sample exactly once over shared memory"
            assert sorted(over_socket) == list(range(n))
            for sample in range(n):
                assert np.array_equal(over_shm[sample], over_socket[sample])
                assert np.array_equal(over_shm[sample], (sample * 1000 + np.arange(16)) % 9973)
        assert shm.stats()["transport"] == "shm" and sock.stats()["transport"] == "socket"
        assert shm.stats()["bytes"] == sock.stats()["bytes"] > 0
        transports = sorted(c["transport"] for c in request_stats(server.endpoint)["clients"])
        assert transports == ["shm", "socket"]


def test_shm_batches_are_read_only_views_on_a_private_read_only_mapping(start_server, id_dataset):
    folder, _ = id_dataset
    server = ids_server(start_server, folder)
    with BatchStream(server.endpoint, transport="shm") as stream:
        x, y = next(iter(stream))
        assert not x.flags.writeable and not x.flags.owndata
        with pytest.raises(ValueError):
            x.flags.writeable = True
        segment = stream._conn._segment.offer.segment
        mode = os.stat(os.path.join(SHM_DIR, segment)).st_mode
        assert stat.S_IMODE(mode) == 0o600, "only the server's user may map the slots"
        maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if segment in line]
        assert maps and all(line.split()[1] == "r--s" for line in maps), maps


UNSHARED_CLIENT = """
    import json, sys
    from loader_client import BatchStream, ShmUnavailable
    url = sys.argv[1]
    with BatchStream(url, transport="auto") as s:
        rows = sum(len(y) for _, y in s)
        out = {"rows": rows, **s.stats()}
    try:
        BatchStream(url, transport="shm").close()
        out["forced"] = "no error"
    except ShmUnavailable as e:
        out["forced"] = str(e)
    print(json.dumps(out))
"""


def private_dev_shm() -> tuple[str, ...]:
    """A command prefix: a new mount namespace with its own empty /dev/shm, as a container that
    does not share the server's IPC namespace has."""
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here (needs root and unshare): {probe.stderr.strip()}")
    return ("unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh")


def test_client_that_cannot_see_the_servers_dev_shm_uses_the_socket_and_says_why(start_server, id_dataset):
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    out = run_client(UNSHARED_CLIENT, server.endpoint, prefix=private_dev_shm())
    assert out["rows"] == n and out["transport"] == "socket"
    assert "is not visible here" in out["transport_reason"]
    assert "transport='shm'" in out["forced"] and "ipc:" in out["forced"]


OTHER_USER_CLIENT = """
    import json, os, sys
    from loader_client import BatchStream, ShmUnavailable
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
    with BatchStream(sys.argv[1], transport="auto") as s:
        rows = sum(len(y) for _, y in s)
        print(json.dumps({"rows": rows, "uid": os.getuid(), **s.stats()}))
"""


def test_client_running_as_another_user_uses_the_socket_and_says_why(start_server, id_dataset):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    out = run_client(OTHER_USER_CLIENT, server.endpoint)
    assert out["uid"] == 65534 and out["rows"] == n and out["transport"] == "socket"
    assert "not readable by this user (uid 65534)" in out["transport_reason"]


HOLDING_CLIENT = """
    import sys, time
    from loader_client import BatchStream
    s = BatchStream(sys.argv[1], transport="shm", prefetch=4)
    kept = [b for _, b in zip(range(6), s)]
    print("holding", len(kept), flush=True)
    while True:
        time.sleep(1)
"""


def test_killed_client_has_its_slots_reclaimed_after_the_client_timeout(start_server, tmp_path):
    write_id_dataset(tmp_path / "d", [64] * 8)
    server = ids_server(start_server, tmp_path / "d", "--client-timeout", "3")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDING_CLIENT), server.endpoint],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "holding 6"
        held = wait_for(lambda: [c["slots_held"] for c in request_stats(server.endpoint)["clients"]
                                 if c["transport"] == "shm" and c["slots_held"] >= 6], 10, "the client's slots")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()

        def forgotten() -> dict | None:
            stats = request_stats(server.endpoint)
            return None if stats["clients"] else stats

        stats = wait_for(forgotten, 30, "the killed client to be forgotten")
        assert time.monotonic() - killed >= 2.0, "slots reclaimed before the client timeout"
        assert stats["datasets"]["train"]["free_slots"] >= held[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with BatchStream(server.endpoint, transport="shm") as stream:
        assert sorted(epoch_by_id(stream)) == list(range(512))


def test_slots_held_by_an_idle_reader_are_never_reused_while_it_lives(start_server, tmp_path):
    """A reader that keeps batches and stays idle past --client-timeout still owns their slots
    (it pings while it holds any), however hard another client drives the workers meanwhile."""
    write_id_dataset(tmp_path / "d", [64] * 8)
    server = ids_server(start_server, tmp_path / "d", "--client-timeout", "3")
    with BatchStream(server.endpoint, transport="shm", prefetch=2) as idle:
        kept = [b for _, b in zip(range(3), idle)]
        copies = [tuple(np.array(a) for a in b) for b in kept]
        started = time.monotonic()
        with BatchStream(server.endpoint, transport="shm") as busy:
            epochs = 0
            while epochs < 3 or time.monotonic() - started < 7:
                assert sorted(epoch_by_id(busy)) == list(range(512))
                epochs += 1
        for batch, copy in zip(kept, copies):
            for a, b in zip(batch, copy):
                assert np.array_equal(a, b), "a slot was overwritten under a live reader"
        assert idle.stats()["transport"] == "shm"


def test_slow_client_pins_a_bounded_number_of_slots_and_others_get_their_epochs(start_server, tmp_path):
    write_id_dataset(tmp_path / "d", [64] * 8)
    server = ids_server(start_server, tmp_path / "d")
    with BatchStream(server.endpoint, transport="shm") as slow:
        slow._conn.request(0, list(range(32)))  # asks for a whole epoch, reads nothing
        limit = slow._conn.max_held
        with BatchStream(server.endpoint, transport="shm") as other:
            for _ in range(2):
                assert sorted(epoch_by_id(other)) == list(range(512))
        held = [c["slots_held"] for c in request_stats(server.endpoint)["clients"] if c["outstanding"] > 0]
        assert held and 0 < held[0] <= limit
        assert sorted(epoch_by_id(slow)) == list(range(512)), "the slow client still gets its epoch"


def raw_session(endpoint: str) -> tuple[zmq.Socket, protocol.Message]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(protocol.encode("hello", {"dataset": "train"}))
    return sock, receive(sock)


def receive(sock: zmq.Socket) -> protocol.Message:
    assert sock.poll(10_000), "no answer from the server"
    return protocol.decode(sock.recv_multipart())


def test_forged_slot_release_and_wrong_nonce_are_refused_and_serving_goes_on(start_server, id_dataset):
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    sock, welcome = raw_session(server.endpoint)
    try:
        sock.send_multipart(protocol.encode("attach", {"nonce": b"\0" * protocol.NONCE_BYTES}))
        refused = receive(sock)
        assert refused.type == "error" and refused["code"] == "shm_refused"
        segment = welcome["shm"]["segment"]
        with open(os.path.join(SHM_DIR, segment), "rb") as f:
            nonce = HEADER.unpack(f.read(HEADER.size))[2]
        sock.send_multipart(protocol.encode("attach", {"nonce": nonce}))
        attached = receive(sock)
        assert attached.type == "attached" and attached["max_held"] > 0
        sock.send_multipart(protocol.encode("request", {"epoch": 0, "batches": [0]}))
        lent = receive(sock)
        assert lent.type == "slot"
        for forged in ([lent["slot"], lent["gen"] + 1], [(lent["slot"] + 1) % welcome["shm"]["nslots"], 1]):
            sock.send_multipart(protocol.encode("release", {"slots": [forged]}))
            reply = receive(sock)
            assert reply.type == "error" and reply["code"] == "bad_release" and "not lent to you" in reply["message"]
        sock.send_multipart(protocol.encode("release", {"slots": [[lent["slot"], lent["gen"]]]}))
        sock.send_multipart(protocol.encode("release", {"slots": [[lent["slot"], lent["gen"]]]}))
        assert receive(sock)["code"] == "bad_release", "a slot released twice is refused the second time"
        with BatchStream(server.endpoint, transport="shm") as honest:
            assert sorted(epoch_by_id(honest)) == list(range(n))
        stats = request_stats(server.endpoint)
        assert stats["rejected"]["bad_release"] == 3 and stats["rejected"]["shm_refused"] == 1
    finally:
        sock.close(0)


def test_four_shm_clients_at_once_get_disjoint_shards_exactly_once(start_server, tmp_path):
    write_id_dataset(tmp_path / "d", [64] * 8)
    server = ids_server(start_server, tmp_path / "d")
    streams = [BatchStream(server.endpoint, shard=(rank, 4), transport="shm") for rank in range(4)]
    try:
        iterators = [iter(s) for s in streams]
        seen: list[int] = []
        for batches in zip(*iterators):  # all four read at once, batch by batch
            for _, y in batches:
                seen += y.astype(int).tolist()
        assert sorted(seen) == list(range(512))
        assert all(s.stats()["transport"] == "shm" for s in streams)
    finally:
        for s in streams:
            s.close()


def recording_sequence(url: str, **kwargs):
    """A RemoteSequence that records the sample ids of every batch Keras pulled, per epoch and
    batch index (the two batches fit reads first, to learn their shapes, come again in epoch 0)."""
    pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")
    from loader_client import RemoteSequence

    class Recording(RemoteSequence):
        def __init__(self) -> None:
            super().__init__(url, **kwargs)
            self.ids: dict[int, dict[int, list[int]]] = {}

        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            self.ids.setdefault(self.epoch, {})[index] = y.astype(int).tolist()
            return x, y

    return Recording()


def test_keras_fit_with_several_enqueuer_threads_over_shm_sees_every_sample_once(start_server, tmp_path):
    import keras

    write_id_dataset(tmp_path / "d", [64] * 8)
    server = ids_server(start_server, tmp_path / "d")
    seq = recording_sequence(server.endpoint, workers=4)
    try:
        assert seq.stats()["transport"] == "shm" and seq.workers == 4
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(seq, epochs=2, shuffle=True, verbose=0)
        assert sorted(seq.ids) == [0, 1]
        for batches in seq.ids.values():
            assert sorted(sum(batches.values(), [])) == list(range(512))
        assert seq.stats()["copied"] == 0, "Keras's queue fits in the client's share of slots"
    finally:
        seq.close()


def test_as_tf_dataset_over_shm_yields_each_epoch_once_with_valid_arrays(start_server, id_dataset):
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    seq = recording_sequence(server.endpoint)
    try:
        ds = seq.as_tf_dataset()
        for _ in range(2):
            ys = [int(v) for _, y in ds for v in y.numpy()]
            assert sorted(ys) == list(range(n))
        for x, y in ds:
            assert np.array_equal(x.numpy(), (y.numpy()[:, None].astype(int) * 1000 + np.arange(16)) % 9973)
        assert seq.stats()["transport"] == "shm"
    finally:
        seq.close()
