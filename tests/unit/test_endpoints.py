"""Endpoint parsing: what binds and connects accept, and a message naming the option, the
problem and the fix for everything else (libzmq itself would wrap a port past 65535)."""

from __future__ import annotations

import pytest
import zmq

from loader_client.endpoints import Endpoint, EndpointError, parse


@pytest.mark.parametrize("text, host, port", [
    ("tcp://127.0.0.1:5555", "127.0.0.1", 5555),
    ("tcp://localhost:1", "localhost", 1),
    ("tcp://loader:65535", "loader", 65535),
    ("tcp://npyloader_loader_1:5555", "npyloader_loader_1", 5555),
    ("tcp://[::1]:5555", "::1", 5555),
    ("tcp://[fe80::1%eth0]:5555", "fe80::1%eth0", 5555),
])
def test_tcp_endpoints_both_sides_accept(text, host, port):
    for bind in (True, False):
        ep = parse(text, "--bind", bind=bind)
        assert (ep.scheme, ep.host, ep.port) == ("tcp", host, port)
        assert ep.for_zmq() == text


@pytest.mark.parametrize("text, zmq_text", [
    ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*"),
    ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
    ("tcp://*:5555", "tcp://*:5555"),
    ("tcp://0.0.0.0:0", "tcp://0.0.0.0:*"),
    ("tcp://[::]:0", "tcp://[::]:*"),
    ("ipc://*", "ipc://*"),
])
def test_a_bind_may_ask_for_any_free_port_or_every_interface(text, zmq_text):
    assert parse(text, "--bind", bind=True).for_zmq() == zmq_text


def test_ipc_paths_up_to_the_socket_limit():
    longest = "/" + "p" * (zmq.IPC_PATH_MAX_LEN - 1)
    assert parse(f"ipc://{longest}", "--bind", bind=True) == Endpoint(f"ipc://{longest}", "ipc", path=longest)
    assert parse("ipc://@abstract", "--connect", bind=False).path == "@abstract"
    line = str(_refused(f"ipc://{longest}x", "--bind", bind=True))
    assert f"{zmq.IPC_PATH_MAX_LEN + 1} bytes" in line and str(zmq.IPC_PATH_MAX_LEN) in line and "shorter" in line


def _refused(text: str, option: str, *, bind: bool) -> EndpointError:
    with pytest.raises(EndpointError) as info:
        parse(text, option, bind=bind)
    message = str(info.value)
    assert message.startswith(f"{option} {text!r}: "), message
    return info.value


@pytest.mark.parametrize("text, says", [
    ("tcp://127.0.0.1:99999", ["port 99999 is out of range", "1-65535", "0 or * for any free port"]),
    ("tcp://127.0.0.1:65536", ["port 65536 is out of range"]),
    ("tcp://127.0.0.1:-1", ["'-1' is not a number"]),
    ("tcp://127.0.0.1:http", ["'http' is not a number"]),
    ("tcp://127.0.0.1:", ["'' is not a number"]),
    ("tcp://127.0.0.1:5555/", ["'5555/' is not a number"]),
    ("tcp://127.0.0.1: 5555", ["' 5555' is not a number"]),
    ("tcp://127.0.0.1:５５５５", ["is not a number"]),  # full-width digits: int() would take them
    ("tcp://127.0.0.1", ["no port", "tcp://HOST:PORT"]),
    ("tcp://:5555", ["host is empty", "tcp://0.0.0.0:PORT"]),
    ("tcp://::1:5555", ["IPv6 address goes in brackets", "tcp://[::1]:PORT"]),
    ("tcp://[::1:5555", ["closing bracket"]),
    ("tcp://[::1]5555", ["closing bracket"]),
    ("tcp://[nope]:5555", ["[nope] is not an IPv6 address"]),
    ("tcp://300.1.1.1:5555", ["'300.1.1.1' is not an IPv4 address"]),
    ("tcp://eth0;127.0.0.1:5555", ["'eth0;127.0.0.1' is not a host name"]),
    ("tcp://my host:5555", ["'my host' is not a host name"]),
    ("http://127.0.0.1:5555", ["scheme 'http://' is not supported", "tcp://HOST:PORT", "ipc://PATH"]),
    ("inproc://x", ["scheme 'inproc://' is not supported"]),
    ("127.0.0.1:5555", ["there is no scheme", "tcp://127.0.0.1:5555"]),
    ("", ["there is no scheme"]),
    ("ipc://", ["there is no path"]),
])
def test_malformed_endpoints_are_refused_naming_the_option_and_the_fix(text, says):
    line = str(_refused(text, "--bind", bind=True))
    for part in says:
        assert part in line, line


@pytest.mark.parametrize("text, says", [
    ("tcp://127.0.0.1:0", "port 0 only means 'any free port' to a server's bind"),
    ("tcp://127.0.0.1:*", "port * only means 'any free port'"),
    ("tcp://*:5555", "host * only means every interface"),
    ("ipc://*", "ipc://* only means 'a new path'"),
    ("tcp://127.0.0.1:99999", "port 99999 is out of range; ports are 1-65535"),
])
def test_a_connect_needs_a_real_host_and_port(text, says):
    line = str(_refused(text, "--connect", bind=False))
    assert says in line, line
    assert "0 or *" not in line


def test_ipv6_sets_the_socket_option_libzmq_needs():
    ctx = zmq.Context()
    try:
        for text, wanted in (("tcp://[::1]:0", 1), ("tcp://127.0.0.1:0", 0)):
            sock = ctx.socket(zmq.ROUTER)
            try:
                ep = parse(text, "--bind", bind=True)
                ep.prepare(sock)
                assert sock.getsockopt(zmq.IPV6) == wanted
            finally:
                sock.close(0)
    finally:
        ctx.term()


def test_loopback():
    assert parse("tcp://127.0.0.2:1", "url", bind=False).loopback
    assert parse("tcp://localhost:1", "url", bind=False).loopback
    assert parse("tcp://[::1]:1", "url", bind=False).loopback
    assert not parse("tcp://0.0.0.0:1", "url", bind=True).loopback
    assert not parse("tcp://*:1", "url", bind=True).loopback
    assert not parse("ipc:///tmp/x", "url", bind=False).loopback
