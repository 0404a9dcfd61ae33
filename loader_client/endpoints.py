"""Endpoints a user types (`--bind`, `--worker-bind`, `--connect`, `npyloader stats URL`, a
client's `url`), checked before ZeroMQ sees them.

libzmq is lenient exactly where a mistake costs most: it wraps a port past 65535 (`:99999`
binds port 34463), and a connect to an empty host or port 0 succeeds and then waits forever.
So each endpoint is parsed here once, and a mistake becomes one message naming the option,
what is wrong and what to write instead. Client and server share this module; the client
package must not import the server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import zmq

SCHEMES = ("tcp", "ipc")
ANY = "*"  # bind only: every interface (as a host), or a free port / a generated ipc path
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_DOTTED = re.compile(r"[0-9.]+")
_FORMS = "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555, tcp://[::1]:5555) or ipc://PATH"


class EndpointError(ValueError):
    """An endpoint is malformed; the message names the option it came from and the fix."""


@dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint. `port` 0 (bind only) asks for any free port."""

    text: str
    scheme: str
    host: str = ""   # tcp: a name, an IPv4 or IPv6 address (without brackets), or "*"
    port: int = 0
    path: str = ""   # ipc

    @property
    def ipv6(self) -> bool:
        """libzmq refuses IPv6 addresses on a socket without the IPV6 option."""
        return ":" in self.host

    @property
    def loopback(self) -> bool:
        return self.scheme == "tcp" and (self.host.startswith("127.") or self.host in ("localhost", "::1"))

    def for_zmq(self) -> str:
        """The text to bind or connect: libzmq spells "any free port" as `*`, not 0."""
        if self.scheme == "ipc":
            return self.text
        host = f"[{self.host}]" if self.ipv6 else self.host
        return f"tcp://{host}:{self.port or ANY}"

    def prepare(self, sock: zmq.Socket) -> None:
        """Set what this endpoint needs on `sock` before it binds or connects."""
        if self.ipv6:
            sock.setsockopt(zmq.IPV6, 1)


def parse(text: str, option: str, *, bind: bool) -> Endpoint:
    """`text` as an Endpoint, or EndpointError naming `option`. `bind` allows what only a
    listening socket can use: host `*`, port 0 or `*`, ipc path `*`."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        problem = f"scheme {scheme + '://'!r} is not supported" if sep else "there is no scheme"
        raise EndpointError(f"{option} {text!r}: {problem}; write {_FORMS}")
    parser = _ipc if scheme == "ipc" else _tcp
    return parser(text, rest, _Given(option, text, bind))


@dataclass(frozen=True)
class _Given:
    """Where an endpoint came from, so that each error names the option as the user typed it."""

    option: str
    text: str
    bind: bool

    def error(self, what: str) -> EndpointError:
        return EndpointError(f"{self.option} {self.text!r}: {what}")


def _tcp(text: str, rest: str, given: _Given) -> Endpoint:
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]")
        if not sep or not port.startswith(":"):
            raise given.error("an IPv6 address needs its closing bracket and a port, e.g. tcp://[::1]:5555")
        port = port[1:]
        _check_ipv6(host, given)
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise given.error("there is no port; write tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555")
        _check_host(host, given)
    return Endpoint(text, "tcp", host, _port(port, given))


def _check_ipv6(host: str, given: _Given) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise given.error(f"[{host}] is not an IPv6 address; write e.g. tcp://[::1]:5555") from None


def _check_host(host: str, given: _Given) -> None:
    if not host:
        anywhere = " (or tcp://0.0.0.0:PORT to listen on every interface)" if given.bind else ""
        raise given.error(f"the host is empty; write an address or host name, e.g. tcp://127.0.0.1:PORT{anywhere}")
    if host == ANY:
        if not given.bind:
            raise given.error("host * only means every interface to a server's bind; connect to the "
                              "server's address or host name instead")
        return
    if ":" in host:
        raise given.error(f"an IPv6 address goes in brackets: tcp://[{host}]:PORT")
    if not _HOST_NAME.fullmatch(host):
        raise given.error(f"host {host!r} is not a host name or IP address")
    if _DOTTED.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise given.error(f"host {host!r} is not an IPv4 address") from None


def _port(port: str, given: _Given) -> int:
    free = " (0 or * for any free port)" if given.bind else ""
    if port == ANY or port == "0":
        if given.bind:
            return 0
        raise given.error(f"port {port} only means 'any free port' to a server's bind; give the port "
                          "the server listens on")
    if not (port.isascii() and port.isdigit()):
        raise given.error(f"port {port!r} is not a number; ports are 1-65535{free}")
    number = int(port)
    if not 1 <= number <= 65535:
        raise given.error(f"port {number} is out of range; ports are 1-65535{free}")
    return number


def _ipc(text: str, path: str, given: _Given) -> Endpoint:
    if not path:
        raise given.error("there is no path; write ipc://PATH, e.g. ipc:///tmp/npyloader.sock")
    if path == ANY and not given.bind:
        raise given.error("ipc://* only means 'a new path' to a server's bind; give the path the server listens on")
    size = len(path.encode())
    if size > zmq.IPC_PATH_MAX_LEN:
        raise given.error(f"the path is {size} bytes, more than the {zmq.IPC_PATH_MAX_LEN} an ipc socket "
                          "allows; use a shorter one, e.g. under /tmp")
    return Endpoint(text, "ipc", path=path)
