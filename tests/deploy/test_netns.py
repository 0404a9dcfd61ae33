"""loader_server/tools/netlab/hosts.py: two hosts in network namespaces reach each other, and nothing else; teardown
stops every process and removes both namespaces, also when the body fails."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader_server.tools.netlab.hosts import IP, netns_unavailable_reason, two_hosts
from tests.helpers import pid_alive

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                reason=str(netns_unavailable_reason()))

REPO = Path(__file__).resolve().parents[2]

ECHO_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
conn, peer = srv.accept()
with conn:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    conn.sendall(f"{peer[0]} said ".encode() + data)
"""

ECHO_CLIENT = r"""
import errno, socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.sendall(b"hello\n")
    print(c.makefile().readline().strip())
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("192.0.2.1", 9))        # TEST-NET-1: outside the /30
    print("outside: connected")
except OSError as e:
    print("outside:", errno.errorcode.get(e.errno, e))
"""


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.05):
                return proc.stdout.readline().strip()
            if proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before printing a line")
    raise AssertionError(f"no line from the process within {timeout}s")


def netns_list() -> str:
    return subprocess.run([IP, "netns", "list"], capture_output=True, text=True, check=True).stdout


def root_addresses() -> str:
    return subprocess.run([IP, "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout


def test_tcp_echo_between_two_hosts_and_nowhere_else():
    before = root_addresses()
    with two_hosts() as (a, b):
        assert a.name != b.name and a.address != b.address
        assert a.name in netns_list() and b.name in netns_list()
        assert a.address not in root_addresses() and b.address not in root_addresses()

        server = a.popen([sys.executable, "-c", ECHO_SERVER, a.address],
                         stdout=subprocess.PIPE, text=True)
        port = int(read_line(server, timeout=10))
        client = b.run([sys.executable, "-c", ECHO_CLIENT, a.address, str(port)],
                       capture_output=True, text=True, timeout=30)
        assert client.returncode == 0, client.stderr
        echoed, outside = client.stdout.splitlines()
        assert echoed == f"{b.address} said hello"
        assert outside == "outside: ENETUNREACH", "a host has a route beyond its /30"
        assert server.wait(timeout=10) == 0

        # Only the /30's own route in each host: no default route, no NAT.
        for host in (a, b):
            routes = host.run([IP, "-4", "route", "show"], capture_output=True, text=True, check=True)
            assert len(routes.stdout.splitlines()) == 1 and "default" not in routes.stdout, routes.stdout

        # The venv's python imports the project from inside a namespace.
        r = b.run([sys.executable, "-c", "import loader_client, loader_server; print(loader_server.__file__)"],
                  capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()).is_relative_to(REPO)

    names = netns_list()
    assert a.name not in names and b.name not in names
    assert root_addresses() == before


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_teardown_stops_every_process_and_deletes_namespaces_when_the_body_fails(exc):
    # A process that ignores SIGTERM and a grandchild in a session of its own: both must go.
    stubborn_code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(exc):
        with two_hosts(grace=0.3) as (a, b):
            polite = b.popen([sys.executable, "-c", "import time; time.sleep(600)"])
            stubborn = a.popen([sys.executable, "-c", stubborn_code], stdout=subprocess.PIPE, text=True)
            grandchild = int(read_line(stubborn, timeout=10))
            raise exc("body failed")

    assert polite.poll() is not None and stubborn.poll() is not None
    assert not pid_alive(grandchild)
    names = netns_list()
    assert a.name not in names and b.name not in names
    stubborn.stdout.close()
