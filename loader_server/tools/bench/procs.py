"""The `npyloader` processes a bench measures: start one with its log in a file, find its
children, stop it (waiting for a line in its log is local_server.wait_for_line).

Apart from the runner so that the start-up measurement uses the same helpers without
importing the whole loader comparison.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from loader_server.tools.local_server import npyloader_command

JOIN = re.compile(r"remote workers may join at (tcp://[^\s;]+)")


def npyloader_process(*args: str, log_path: Path) -> subprocess.Popen:
    """`npyloader ARGS` in a child process, stdout and stderr into `log_path`."""
    with open(log_path, "w") as out:
        return subprocess.Popen(npyloader_command(*args), stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except OSError:
                continue
    return kids


def _status_mb(pid: int | str, field_name: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field_name)) / 1024
    except (OSError, StopIteration):
        return 0.0


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory; it includes file pages a process has memory-mapped (page cache)."""
    return _status_mb(pid, "VmHWM")


def private_mb(pid: int | str = "self") -> float:
    """Anonymous resident memory: what the process allocated itself, without mapped file pages."""
    return _status_mb(pid, "RssAnon")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, from /proc (OSError once it is gone)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
