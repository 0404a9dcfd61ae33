"""Faults on the veth link between the two hosts of `two_hosts()`: loss, a partition, a bandwidth cap.

    with two_hosts() as (a, b), Link(a, b) as link:
        link.loss(0.05, port=5556)      # 5% of the packets each way, on connections to or from port 5556
        link.partition(port=5556)        # every packet of those connections dropped, both ways
        link.heal()                      # every rule of this Link removed
        link.cap(10)                     # 10 Mbit/s each way (tbf on both veth ends)

A real network loses packets and TCP resends them; these are real packet drops in the kernel
(iptables' `statistic` match and DROP), so the endpoints see what they would see on a bad link:
retransmissions, stalls, and during a partition, silence without a reset. Rules go in INPUT only,
on each host: a packet leaves its sender and is lost on the way. (A DROP in OUTPUT would fail the
sender's own send with EPERM, which no real network does.) Delay has no kernel qdisc here (no
`netem`), so it comes from `loader_server.tools.netlab.relay` instead.

Everything happens inside the two namespaces; the machine's own firewall is never touched. Leaving
the `with` block removes every rule and qdisc (deleting the namespaces would too).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from loader_server.tools.netlab.hosts import (
    VETH,
    Host,
    NetnsError,
    netns_unavailable_reason,
    two_hosts,
)

_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
IPTABLES = shutil.which("iptables", path=_PATH)
TC = shutil.which("tc", path=_PATH)
CHAIN = "NPL-FAULTS"


def _run(host: Host, argv: list[str]) -> None:
    r = host.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} in {host.name}: {r.stderr.strip() or f'exit {r.returncode}'}")


@dataclass
class Link:
    """The veth link between two hosts, with the faults applied to it right now."""

    a: Host
    b: Host
    _ready: bool = field(default=False, repr=False)
    _capped: bool = field(default=False, repr=False)

    def __enter__(self) -> Link:
        reason = link_faults_unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        for host in (self.a, self.b):
            _run(host, [IPTABLES, "-w", "-N", CHAIN])
            _run(host, [IPTABLES, "-w", "-I", "INPUT", "-i", VETH, "-j", CHAIN])
        self._ready = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()
        self.uncap()

    def _drop(self, probability: float | None, port: int | None) -> None:
        match = ["-p", "tcp", "-m", "multiport", "--ports", str(port)] if port is not None else []
        chance = ([] if probability is None else
                  ["-m", "statistic", "--mode", "random", "--probability", f"{probability:.6f}"])
        for host in (self.a, self.b):
            _run(host, [IPTABLES, "-w", "-A", CHAIN, *match, *chance, "-j", "DROP"])

    def loss(self, fraction: float, port: int | None = None) -> None:
        """Drop `fraction` of the packets each way (of TCP connections to or from `port` if given)."""
        if not 0 < fraction < 1:
            raise ValueError(f"loss fraction must be between 0 and 1, got {fraction}")
        self._drop(fraction, port)

    def partition(self, port: int | None = None) -> None:
        """Drop every packet each way (of TCP connections to or from `port` if given) until heal()."""
        self._drop(None, port)

    def heal(self) -> None:
        """Remove every loss and partition rule; a cap stays (uncap() removes it)."""
        if self._ready:
            for host in (self.a, self.b):
                _run(host, [IPTABLES, "-w", "-F", CHAIN])

    def cap(self, mbit: float, burst_kbit: int = 32, latency_ms: int = 400) -> None:
        """Limit each way to `mbit` Mbit/s with a token bucket on both veth ends."""
        for host in (self.a, self.b):
            _run(host, [TC, "qdisc", "replace", "dev", VETH, "root", "tbf", "rate", f"{mbit}mbit",
                        "burst", f"{burst_kbit}kbit", "latency", f"{latency_ms}ms"])
        self._capped = True

    def uncap(self) -> None:
        if self._capped:
            for host in (self.a, self.b):
                _run(host, [TC, "qdisc", "del", "dev", VETH, "root"])
            self._capped = False


@functools.lru_cache(maxsize=1)
def link_faults_unavailable_reason() -> str | None:
    """None if Link can drop packets and cap bandwidth here, else a one-line reason to skip."""
    reason = netns_unavailable_reason()
    if reason is not None:
        return reason
    if IPTABLES is None:
        return "`iptables` is not installed (apt-get install iptables)"
    if TC is None:
        return "`tc` (iproute2) is not installed"
    try:
        with two_hosts() as (a, b):
            for host in (a, b):
                _run(host, [IPTABLES, "-w", "-A", "INPUT", "-i", VETH, "-m", "statistic", "--mode", "random",
                            "--probability", "0.5", "-j", "DROP"])
                _run(host, [TC, "qdisc", "replace", "dev", VETH, "root", "tbf", "rate", "10mbit",
                            "burst", "32kbit", "latency", "400ms"])
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot drop packets or cap bandwidth in a namespace here: {str(e).splitlines()[0]}"
    return None


__all__ = ["Link", "link_faults_unavailable_reason"]
