"""loader_server/tools/netlab: the link faults and the delaying relay do what the fault tests rely on.

Lower bounds only (a delay or a cap can make a transfer slower, never faster), so a loaded machine
cannot fail them; every transfer is checked byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from loader_server.tools.netlab.hosts import two_hosts
from loader_server.tools.netlab.link import Link, link_faults_unavailable_reason

UNAVAILABLE = link_faults_unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no link faults: {UNAVAILABLE}")

PORT = 7000
ECHO = textwrap.dedent(f"""
    import socket, sys, threading
    srv = socket.create_server((sys.argv[1], {PORT}))
    print("up", flush=True)
    def echo(c):
        with c:
            try:
                while data := c.recv(65536):
                    c.sendall(data)
            except OSError:
                pass
    while True:
        threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
""")
ROUND_TRIP = textwrap.dedent("""
    import socket, sys, threading, time
    host, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    payload = bytes(range(256)) * (size // 256)
    t = time.monotonic()
    s = socket.create_connection((host, port), timeout=timeout)
    threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
    got = bytearray()
    while len(got) < len(payload):
        got += s.recv(1 << 20)
    print(f"{time.monotonic() - t:.3f}", bytes(got) == payload)
""")


def _round_trip(b, host: str, port: int, size: int, timeout: float = 20) -> tuple[float, bool]:
    r = b.run([sys.executable, "-c", ROUND_TRIP, host, str(port), str(size), str(timeout)],
              capture_output=True, text=True, timeout=timeout + 30)
    if r.returncode != 0:
        raise ConnectionError(r.stderr.strip().splitlines()[-1])
    seconds, same = r.stdout.split()
    return float(seconds), same == "True"


@pytest.fixture
def lab():
    with two_hosts() as (a, b), Link(a, b) as link:
        server = a.popen([sys.executable, "-c", ECHO, a.address], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        yield a, b, link


def test_partition_silences_only_its_port_and_heals(lab):
    a, b, link = lab
    link.partition(port=PORT + 1)
    assert _round_trip(b, a.address, PORT, 100_000)[1], "a partition of another port leaves this one alone"
    link.partition(port=PORT)
    with pytest.raises(ConnectionError, match="timed out"):
        _round_trip(b, a.address, PORT, 1000, timeout=1.5)
    link.heal()
    assert _round_trip(b, a.address, PORT, 100_000)[1]


def test_loss_and_cap_deliver_every_byte(lab):
    a, b, link = lab
    link.loss(0.05, port=PORT)
    assert _round_trip(b, a.address, PORT, 4_000_000)[1]
    link.heal()
    link.cap(10)
    seconds, same = _round_trip(b, a.address, PORT, 2_000_000)
    assert same and seconds > 2_000_000 * 8 / 10e6 * 0.9, f"2 MB each way took {seconds}s at 10 Mbit/s"


def test_relay_delays_each_way_and_keeps_order(lab):
    a, b, _ = lab
    relay = b.popen([sys.executable, "-m", "loader_server.tools.netlab.relay", "--listen", "127.0.0.1:0",
                     "--to", f"{a.address}:{PORT}", "--delay-ms", "100", "--jitter-ms", "20"],
                    stdout=subprocess.PIPE, text=True)
    port = int(relay.stdout.readline().split()[1].rsplit(":", 1)[1])
    seconds, same = _round_trip(b, "127.0.0.1", port, 1000)
    assert same and seconds >= 2 * 0.080, f"a round trip through a 100±20 ms relay took {seconds}s"
    assert _round_trip(b, "127.0.0.1", port, 8_000_000)[1], "8 MB through the jittered relay, in order"
