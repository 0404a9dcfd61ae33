"""Where the soak's processes run: all on this host's loopback, or split over two network
namespaces so that the remote worker's link can lose packets and be cut.

Loss and a partition on a loopback would hit every connection of the machine alike; a real
link is needed to hurt only the remote worker's. When `link_faults_unavailable_reason()` says
the lab works here (root, iproute2, iptables), the server, its local workers and the clients run
in namespace A, the remote `npyloader worker` in namespace B, and it reaches the server's worker
port at A's address over the veth link that `Link` can degrade. The soak's own sockets (stats,
the malformed-message fault) must reach the server too, so the soak's main thread enters A for
as long as the lab stands; it leaves A before the lab is torn down, since tearing down kills
every process whose main thread is in either namespace.

Otherwise everything runs on loopback as before, and the network faults are left out.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from loader_server.tools.netlab.hosts import NETNS_DIR, Host, two_hosts
from loader_server.tools.netlab.link import Link, link_faults_unavailable_reason

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
LOOPBACK = "127.0.0.1"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into a network namespace: {os.strerror(err)}")


@contextmanager
def entered(host: Host) -> Iterator[None]:
    """The calling thread in `host`'s network namespace (sockets it opens, and threads it
    starts, live there), back in its own on exit."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, host.name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


class SoakNetwork:
    """The soak's network: `link` is None when the remote worker's link cannot be faulted
    (`unavailable` says why); then every process runs here, on loopback."""

    def __init__(self) -> None:
        self.unavailable = link_faults_unavailable_reason()
        self._stack = ExitStack()
        self.server_host: Host | None = None
        self.remote_host: Host | None = None
        self.link: Link | None = None
        if self.unavailable is not None:
            return
        try:
            a, b = self._stack.enter_context(two_hosts())
            self.link = self._stack.enter_context(Link(a, b))
            self._stack.enter_context(entered(a))
        except BaseException:
            self._stack.close()
            raise
        self.server_host, self.remote_host = a, b

    @property
    def worker_address(self) -> str:
        """The address the server binds its worker port on and the remote worker connects to."""
        return self.server_host.address if self.server_host is not None else LOOPBACK

    def describe(self) -> str:
        if self.link is None:
            return (f"Network faults did not run: {self.unavailable}. Every process ran on this host's loopback, "
                    "the remote worker included.")
        return ("Network faults ran: the server, its local workers and the clients ran in network namespace A, "
                "the remote `npyloader worker` in namespace B, joined to the server's worker port at A's address "
                "over a veth link on which the faults drop packets (iptables).")

    def prefix(self, remote: bool) -> list[str]:
        """What goes before a command to run it on the server's side, or the remote worker's."""
        host = self.remote_host if remote else self.server_host
        return host.command([]) if host is not None else []

    def close(self) -> None:
        """Leave A, heal the link, stop whatever still runs in the namespaces and delete them."""
        self._stack.close()
