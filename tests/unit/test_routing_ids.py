"""Client sockets carry their own random routing ids: libzmq's automatic ones start from the same
value in every server process, so after a restart one client could take over another's id."""

from __future__ import annotations

import threading

import pytest
import zmq

from loader_client import protocol
from loader_client.stream import (
    ROUTING_ID_BYTES,
    Connection,
    new_routing_id,
    request_stats,
)


@pytest.fixture
def router():
    """A bare ROUTER on a free loopback port standing in for the server; yields (socket, url)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close(0)
        ctx.term()


def receive(sock: zmq.Socket) -> tuple[bytes, protocol.Message]:
    assert sock.poll(10_000), "nothing arrived"
    identity, *frames = sock.recv_multipart()
    return identity, protocol.decode(frames, allowed=protocol.CLIENT_TO_SERVER)


def test_routing_ids_are_random_and_never_start_with_the_zero_byte_libzmq_reserves():
    ids = [new_routing_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == ROUTING_ID_BYTES and i[0] != 0 for i in ids)


def test_two_connections_say_hello_with_different_ids_of_their_own(router, monkeypatch):
    sock, url = router
    # no server to answer: the hello is sent and the handshake not waited for
    monkeypatch.setattr(Connection, "_handshake", lambda self: self._send_control(["hello"]))
    conns = [Connection(url, timeout=1) for _ in range(2)]
    try:
        hellos = dict(receive(sock) for _ in conns)
    finally:
        for conn in conns:
            conn.close()
    assert set(hellos) == {conn.routing_id for conn in conns}
    assert all(msg.type == "hello" for msg in hellos.values())
    assert conns[0].routing_id != conns[1].routing_id
    assert conns[0].stats()["id"] == conns[0].routing_id.hex(), "the id `npyloader stats` lists it under"


def test_each_stats_request_has_a_random_id(router):
    sock, url = router
    seen: list[bytes] = []

    def answer() -> None:
        for _ in range(2):
            identity, msg = receive(sock)
            assert msg.type == "stats"
            seen.append(identity)
            sock.send_multipart([identity, *protocol.encode("stats_reply", {"stats": {}})])

    server = threading.Thread(target=answer)
    server.start()
    try:
        assert request_stats(url, timeout=10) == {}
        assert request_stats(url, timeout=10) == {}
    finally:
        server.join(20)
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(len(i) == ROUTING_ID_BYTES and i[0] != 0 for i in seen)
