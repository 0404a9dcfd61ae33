"""The soak's processes: starting them so none can outlive the soak, naming them safely, and
reading their memory from /proc.

A soak injects faults with signals, and pids are reused: a `ProcRef` is a pid together with
its start time, so a pid the kernel has since handed to another process is never signalled.
Every child starts in its own session (a Ctrl-C at the terminal reaches only the soak, which
then stops everything in order) and asks the kernel for SIGTERM should the soak itself die,
even by SIGKILL, so that no server is left holding the soak's ports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Runs in each child before it becomes the real command: PR_SET_PDEATHSIG survives execve.
_TRAMPOLINE = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(70)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def spawn(args: list[str], log_path: Path, env: dict[str, str], prefix: list[str] | None = None) -> subprocess.Popen:
    """Start `python ARGS` in its own session, output to `log_path`, stopped if the caller dies.
    `prefix` is a command that execs the rest in place (`ip netns exec NAME`), so the child is
    still the caller's own.

    Call it from the main thread: the kernel's parent-death signal follows the thread that
    started the child, not the process."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([*(prefix or []), sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, comes first)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class ProcRef:
    """A process, not just a pid: the start time tells it apart from a later owner of the pid."""

    pid: int
    start: int

    def alive(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and int(fields[19]) == self.start and fields[0] != "Z"

    def signal(self, sig: int) -> bool:
        """Send `sig` if this very process still runs; False if it is gone."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def children(pid: int) -> list[ProcRef]:
    """Live (not zombie) children of `pid`, less multiprocessing's resource tracker, which is a
    helper of the server rather than a worker."""
    kids = []
    for child in _all_pids():
        fields = _stat(child)
        if fields is None or int(fields[1]) != pid or fields[0] == "Z":
            continue
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            kids.append(ProcRef(child, int(fields[19])))
    return kids


def in_groups(pgids: set[int], since: int) -> list[ProcRef]:
    """Live processes in any of these process groups that started at or after `since` (clock
    ticks since boot): the soak's children and their descendants, never an older stranger."""
    found = []
    for pid in _all_pids():
        fields = _stat(pid)
        if fields is None or fields[0] == "Z" or int(fields[2]) not in pgids or int(fields[19]) < since:
            continue
        found.append(ProcRef(pid, int(fields[19])))
    return found


def boot_ticks_now() -> int:
    """This moment as a /proc start time (clock ticks since boot), for `in_groups(since=...)`."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def status_kb(pid: int, key: str) -> int:
    """A memory figure of /proc/PID/status in KiB (e.g. VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))
    except (OSError, ValueError, StopIteration):
        return 0


def shm_segments(pid: int) -> set[str]:
    """Names of the /dev/shm segments a process has mapped (the server's batch slots)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    names = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
            names.add(parts[5].removesuffix(" (deleted)").removeprefix("/dev/shm/"))
    return names


@dataclass
class RoleMemory:
    """Peak and latest resident memory of one role, over every process that filled it."""

    role: str
    pids: set[int] = field(default_factory=set)
    peak_kb: int = 0
    last_kb: int = 0


class MemoryTracker:
    """Samples every role's processes; a process replaced after a fault counts under its role."""

    def __init__(self) -> None:
        self.roles: dict[str, RoleMemory] = {}

    def sample(self, roles: dict[str, list[int]]) -> None:
        for role, pids in roles.items():
            mem = self.roles.setdefault(role, RoleMemory(role))
            current = 0
            for pid in pids:
                mem.pids.add(pid)
                # VmHWM is the kernel's own peak of VmRSS, so a peak between two samples counts too.
                mem.peak_kb = max(mem.peak_kb, status_kb(pid, "VmHWM"))
                current = max(current, status_kb(pid, "VmRSS"))
            if current:
                mem.last_kb = current

