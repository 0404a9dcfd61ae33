"""Two test "hosts" in Linux network namespaces, joined by a veth pair (needs root and iproute2).

    from loader_server.tools.netlab.hosts import netns_unavailable_reason, two_hosts

    pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                    reason=str(netns_unavailable_reason()))

    def test_something():
        with two_hosts() as (a, b):
            server = a.popen([sys.executable, "-m", "...", f"tcp://{a.address}:5555"])
            b.run([sys.executable, "-c", "..."], check=True, timeout=30)

Each host is a fresh network namespace with `lo` and one end of a veth pair, addressed on a
private /30 inside 10.213.0.0/16. Nothing else: no route beyond that /30, no NAT, nothing
created or changed in the host's own namespace (the veth ends are created straight inside the
two namespaces). Only the network differs: processes started with `Host.popen` / `Host.run`
share the filesystem, users and environment, so `sys.executable` and the project import as
usual. Namespaces are only a network boundary, not a sandbox.

`two_hosts()` always tears down: it SIGTERMs what `popen` started, SIGKILLs whatever still
runs in either namespace after a grace period (children and grandchildren included, whatever
their session), then deletes both namespaces, which removes the veth pair. That holds on error
and on KeyboardInterrupt (SIGINT is held back during teardown and delivered after it). Names
carry the pid of the process that made them (`npl-PID-N`), so a later run removes namespaces
left behind by a process that was killed outright.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

IP = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
NETNS_DIR = "/run/netns"          # where `ip netns add` mounts a namespace
PREFIX = "npl"                    # namespace names: npl-PID-N
VETH = "npl0"                     # the veth end's name inside each namespace
SUBNET = (10, 213)                # 10.213.0.0/16, cut into /30s: 16384 pairs
_STALE = re.compile(rf"^{PREFIX}-(\d+)-\S+")
_counter = itertools.count()
_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An `ip` command failed; the message has the command and its stderr."""


@dataclass
class Host:
    """One network namespace: run processes in it, reach it at `address` (from its peer only)."""

    name: str
    address: str
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not a string")
        return [IP, "netns", "exec", self.name, *map(os.fspath, argv)]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start `argv` in this namespace (in a new session unless told otherwise).

        `ip netns exec` execs argv in place, so the Popen's pid is argv's own process.
        Whatever is still running when `two_hosts()` exits is stopped there.
        """
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run(argv) in this namespace; `timeout` defaults to 60 s."""
        kw.setdefault("timeout", 60)
        return subprocess.run(self.command(argv), **kw)


def _ip(*args: str, timeout: float = 10) -> str:
    r = subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Delete npl-PID-* namespaces whose PID is gone (a run that was killed before teardown)."""
    try:
        listing = _ip("netns", "list")
    except (NetnsError, OSError, subprocess.TimeoutExpired):
        return
    for line in listing.splitlines():
        m = _STALE.match(line)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            name = line.split()[0]
            for pid in _pids_in(name):
                _kill(pid, name)
            try:
                _ip("netns", "delete", name)
            except (NetnsError, subprocess.TimeoutExpired):
                pass


def _add_netns(name: str) -> None:
    try:
        _ip("netns", "add", name)
    except NetnsError as e:
        if "exists" not in str(e):
            raise
        # Our pid and counter made this name, so it is a leftover of a dead process that had
        # the same pid: replace it.
        _ip("netns", "delete", name)
        _ip("netns", "add", name)


def _ns_id(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(name: str) -> list[int]:
    """Live processes whose network namespace is `name` (what `ip netns pids` prints)."""
    ident = _ns_id(name)
    if ident is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:           # gone, or a zombie
            continue
        if (st.st_dev, st.st_ino) == ident:
            pids.append(int(entry))
    return pids


def _kill(pid: int, name: str) -> None:
    """SIGKILL `pid` if it is still the process in namespace `name` (pidfd: no pid-reuse race)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
        if (st.st_dev, st.st_ino) == _ns_id(name):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stop_all(hosts: list[Host], names: list[str], grace: float) -> None:
    """SIGTERM what popen started, then SIGKILL everything left in the namespaces; reap."""
    procs = [p for h in hosts for p in h._procs]
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)

    deadline = time.monotonic() + 10
    while True:
        left = [(pid, n) for n in names for pid in _pids_in(n)]
        for pid, n in left:
            _kill(pid, n)
        for p in procs:            # reap ours, so they leave /proc
            if p.poll() is None:
                try:
                    p.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        if not left and all(p.poll() is not None for p in procs):
            return
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {[pid for pid, _ in left]} in {names} survived SIGKILL")
        time.sleep(0.01)


def _teardown(hosts: list[Host], names: list[str], grace: float) -> list[str]:
    errors = []
    try:
        _stop_all(hosts, names, grace)
    except Exception as e:  # noqa: BLE001 -- still delete the namespaces
        errors.append(str(e))
    for name in names:
        try:
            _ip("netns", "delete", name)
        except (NetnsError, subprocess.TimeoutExpired) as e:
            if _ns_id(name) is not None:
                errors.append(str(e))
    return errors


def _wait_reachable(src: Host, dst: str, timeout: float) -> None:
    """TCP connect from `src` to `dst` until the peer's kernel answers (accept or refuse)."""
    code = (
        "import socket, sys, time\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while True:\n"
        "    s = socket.socket()\n"
        "    s.settimeout(0.5)\n"
        "    try:\n"
        f"        s.connect(({dst!r}, 9))\n"
        "        sys.exit(0)\n"
        "    except ConnectionRefusedError:\n"
        "        sys.exit(0)\n"
        "    except OSError as e:\n"
        "        if time.monotonic() > deadline:\n"
        "            sys.exit(f'{e}')\n"
        "        time.sleep(0.01)\n"
        "    finally:\n"
        "        s.close()\n"
    )
    r = src.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                timeout=timeout + 10)
    if r.returncode != 0:
        raise NetnsError(f"{src.name} cannot reach {dst} within {timeout}s: {r.stderr.strip()}")


@contextmanager
def two_hosts(grace: float = 5.0, reach_timeout: float = 5.0) -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair on a private /30; always removed on exit.

    `grace`: seconds that processes get after SIGTERM before everything left is SIGKILLed.
    """
    reason = netns_unavailable_reason()
    if reason is not None:
        raise NetnsError(reason)
    _remove_stale()
    with _lock:
        n = next(_counter)
    pid = os.getpid()
    names = [f"{PREFIX}-{pid}-{2 * n}", f"{PREFIX}-{pid}-{2 * n + 1}"]
    # A /30 per pair, from the pid and a per-process counter: parallel runs get different
    # subnets. (Equal subnets would not meet anyway: each pair is its own isolated network.)
    index = (pid * 16 + n) % 16384
    base = f"{SUBNET[0]}.{SUBNET[1]}.{index // 64}"
    first = (index % 64) * 4
    hosts = [Host(names[0], f"{base}.{first + 1}"), Host(names[1], f"{base}.{first + 2}")]

    created: list[str] = []
    failure: BaseException | None = None
    try:
        for name in names:
            created.append(name)   # delete it even if `add` fails half-way
            _add_netns(name)
        # Both veth ends are created inside their namespaces, never in the host's.
        _ip("link", "add", VETH, "netns", names[0], "type", "veth", "peer", "name", VETH, "netns", names[1])
        for host in hosts:
            _ip("-n", host.name, "addr", "add", f"{host.address}/30", "dev", VETH)
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "link", "set", VETH, "up")
        _wait_reachable(hosts[0], hosts[1].address, reach_timeout)
        yield hosts[0], hosts[1]
    except BaseException as e:
        failure = e
        raise
    finally:
        # Hold Ctrl-C back while tearing down (main thread only); it is delivered right after.
        masked = threading.current_thread() is threading.main_thread()
        if masked:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            errors = _teardown(hosts, created, grace)
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if errors:
            if failure is None:
                raise NetnsError("teardown: " + "; ".join(errors))
            failure.add_note("two_hosts() teardown: " + "; ".join(errors))


@functools.lru_cache(maxsize=1)
def netns_unavailable_reason() -> str | None:
    """None if two_hosts() can work here, else a one-line reason to skip."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if IP is None:
        return "`ip` (iproute2) is not installed"
    if not hasattr(os, "pidfd_open"):
        return "os.pidfd_open is missing (Linux 5.3+ needed)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        try:
            _add_netns(probe)
            _ip("-n", probe, "link", "add", VETH, "type", "veth", "peer", "name", "npl1")
            r = subprocess.run([IP, "netns", "exec", probe, sys.executable, "-I", "-S", "-c", ""],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                return f"`ip netns exec` fails here: {r.stderr.strip().splitlines()[-1:]}"
        finally:
            if _ns_id(probe) is not None:
                _ip("netns", "delete", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create network namespaces here: {str(e).splitlines()[0]}"
    return None


__all__ = ["Host", "NetnsError", "netns_unavailable_reason", "two_hosts"]
