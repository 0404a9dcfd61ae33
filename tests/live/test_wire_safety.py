"""A real server on loopback, fed hostile and malformed traffic on a raw DEALER socket.

Whatever arrives, the server answers a well-formed `error` (or, for oversized frames, zmq drops
the connection), never unpickles anything, and keeps serving complete epochs to other clients.
"""

from __future__ import annotations

import random

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq

from loader_client import protocol
from loader_client.stream import BatchStream, request_stats
from tests.helpers import dealer, monitored_dealer, pickle_bomb, wait_for

NUM_SAMPLES = 203
BATCH = 16
NUM_BATCHES = 13
FEATURES = 16
REPLY_TIMEOUT_S = 10.0


@pytest.fixture
def server(start_server, id_dataset):
    folder, n = id_dataset
    assert n == NUM_SAMPLES
    return start_server("--data", str(folder / "*.npy"), "--label-column", "-1",
                        "--batch-size", str(BATCH), workers=1)


def reply(sock: zmq.Socket, server, timeout: float = REPLY_TIMEOUT_S) -> protocol.Message:
    """The next message from the server, failing fast (with its log) if the server died."""
    wait_for(lambda: sock.poll(50) or server.proc.poll() is not None, timeout, "a reply from the server")
    assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode}):\n{server.log()[-3000:]}"
    return protocol.decode(sock.recv_multipart())


def expect_error(sock: zmq.Socket, server, code: str) -> protocol.Message:
    msg = reply(sock, server)
    assert msg.type == "error", msg
    assert msg["code"] == code, msg
    return msg


def assert_full_epoch(server) -> None:
    """A normal client reads one whole epoch: every sample id exactly once, with its features."""
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    with BatchStream(server.endpoint, timeout=20) as stream:
        assert len(stream) == NUM_BATCHES
        ids = []
        for x, y in stream:
            assert x.shape == (len(y), FEATURES)
            y_int = y.astype(np.int64)
            expected = (y_int[:, None] * 1000 + np.arange(FEATURES)[None, :]) % 9973
            np.testing.assert_array_equal(x, expected.astype(x.dtype))
            ids.extend(y_int.tolist())
    assert len(ids) == NUM_SAMPLES
    assert sorted(ids) == list(range(NUM_SAMPLES))


def hello(sock: zmq.Socket, server) -> protocol.Message:
    sock.send_multipart(protocol.encode("hello", {"dataset": "train"}))
    msg = reply(sock, server)
    assert msg.type == "welcome", msg
    assert msg["batches"] == NUM_BATCHES and msg["num_samples"] == NUM_SAMPLES
    return msg


# ---------------------------------------------------------------------------------------------
# Pickle payloads


def test_pickle_payload_is_live(tmp_path):
    """Control: the payload used below does run code when msgpack-numpy decodes it."""
    marker = tmp_path / "control-marker"
    decoded = msgpack_numpy.unpackb(msgpack_numpy.packb(pickle_bomb(marker)))
    try:
        assert marker.exists()
    finally:
        for f in np.asarray(decoded, dtype=object).ravel():
            f.close()


def test_pickle_payloads_never_reach_an_unpickler(server, tmp_path):
    marker = tmp_path / "pwned"
    bomb = pickle_bomb(marker)
    assert b"open" in msgpack_numpy.packb(bomb)  # builtins.open travels in the pickle

    cases = {
        "whole header frame": lambda sock: sock.send_multipart([msgpack_numpy.packb(bomb)]),
        "field of a valid request": lambda sock: (
            hello(sock, server),
            sock.send_multipart([msgpack.packb({"v": protocol.VERSION, "type": "request", "epoch": 0,
                                                "batches": bomb}, default=msgpack_numpy.encode)]),
        ),
        "frame declared as object dtype": lambda sock: sock.send_multipart([
            msgpack.packb({"v": protocol.VERSION, "type": "request", "epoch": 0, "batches": [0],
                           "arrays": [["x", "|O", [1]]]}),
            bomb.dumps(),
        ]),
        "msgpack ext holding the pickle": lambda sock: sock.send_multipart([
            msgpack.packb({"v": protocol.VERSION, "type": "request", "epoch": 0,
                           "batches": msgpack.ExtType(1, bomb.dumps())}),
        ]),
    }
    for what, send in cases.items():
        with dealer(server.endpoint) as sock:
            send(sock)
            msg = expect_error(sock, server, "bad_message")
            assert msg["message"], what
        assert not marker.exists(), f"{what}: the payload was unpickled"
        assert_full_epoch(server)
    assert not marker.exists()
    assert sum(request_stats(server.endpoint)["rejected"].values()) >= len(cases)


def test_structured_dtype_spec_does_not_kill_the_server(server):
    """An `arrays` spec whose dtype is a list (numpy's descr form of a structured dtype) is just
    another bad message: the server must answer it, not crash on it."""
    with dealer(server.endpoint) as sock:
        sock.send_multipart([
            msgpack.packb({"v": protocol.VERSION, "type": "ping",
                           "arrays": [["x", [["a", "<i4"], ["b", "<f4"]], [1]]]}),
            b"\x00" * 8,
        ])
        expect_error(sock, server, "bad_message")
    assert_full_epoch(server)


# ---------------------------------------------------------------------------------------------
# Garbage


def test_random_bytes_are_rejected_and_counted(server):
    rng = random.Random(0)
    sent = 200
    with dealer(server.endpoint) as sock:
        for _ in range(sent):
            frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]
            sock.send_multipart(frames)
        codes = []
        for _ in range(sent):
            msg = reply(sock, server)
            codes.append((msg.type, msg.get("code")))
        assert set(codes) == {("error", "bad_message")}
    assert_full_epoch(server)
    rejected = request_stats(server.endpoint)["rejected"]
    assert rejected and all(v > 0 for v in rejected.values())
    assert sum(rejected.values()) >= sent


# ---------------------------------------------------------------------------------------------
# Well-formed but wrong


def test_well_formed_but_wrong_requests(server):
    with dealer(server.endpoint) as sock:
        sock.send_multipart(protocol.encode("request", {"epoch": 0, "batches": [0]}))
        msg = expect_error(sock, server, "unknown_client")
        assert "hello" in msg["message"]
        sock.send_multipart(protocol.encode("ping"))
        expect_error(sock, server, "unknown_client")

        sock.send_multipart(protocol.encode("hello", {"dataset": "nope"}))
        msg = expect_error(sock, server, "unknown_dataset")
        assert "nope" in msg["message"] and "train" in msg["message"]

        hello(sock, server)
        sock.send_multipart(protocol.encode("request", {"epoch": 2, "batches": [NUM_BATCHES, 0, 99]}))
        got = {}
        for _ in range(3):
            msg = reply(sock, server)
            if msg.type == "error":
                assert msg["code"] == "out_of_range", msg
                assert msg["epoch"] == 2
                assert str(NUM_BATCHES) in msg["message"]
                got[("error", msg["index"])] = msg
            else:
                assert msg.type == "batch", msg
                got[("batch", msg["index"])] = msg
        assert set(got) == {("error", NUM_BATCHES), ("error", 99), ("batch", 0)}
        batch = got[("batch", 0)]
        assert batch["epoch"] == 2 and len(batch.arrays["y"]) == BATCH
    assert_full_epoch(server)


# ---------------------------------------------------------------------------------------------
# Oversized frames


def test_oversized_frame_drops_only_that_connection(server):
    assert protocol.MAX_REQUEST_BYTES == 1 << 20
    with monitored_dealer(server.endpoint) as (sock, next_event):
        assert next_event() == zmq.EVENT_CONNECTED
        sock.send_multipart([b"\x00" * (2 << 20)])
        assert next_event() == zmq.EVENT_DISCONNECTED
        assert server.proc.poll() is None, server.log()[-3000:]
        # the server is unharmed: another client reads a whole epoch
        assert_full_epoch(server)
        # and this socket, reconnected by zmq, is served again
        assert next_event() == zmq.EVENT_CONNECTED
        sock.send_multipart(protocol.encode("stats"))
        msg = reply(sock, server)
        assert msg.type == "stats_reply"
