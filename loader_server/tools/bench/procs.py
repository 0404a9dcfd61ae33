"""Processes of a bench run: starting `npyloader` commands, waiting for their lines, memory from /proc."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"serving .* at (tcp://\S+|ipc://\S+)")
JOIN = re.compile(r"remote workers may join at (tcp://[^\s;]+)")


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


def start_cli(*args: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "loader_server.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_line(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(log_path.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no ready line within {timeout:g}s; see {log_path}")


def stop(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
