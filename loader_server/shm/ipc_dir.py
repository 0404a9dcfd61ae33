"""The server's private folder for its local workers' ipc socket, and the folders killed servers left.

A server stopped by a signal removes its folder itself. One killed with SIGKILL (or by the
OOM killer) cannot, so every start removes the folders of servers that are no longer running:
the folder name carries the owner's pid, and only a folder holding nothing but the socket is
touched, so nothing else that happens to share the prefix is ever deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

import zmq

log = logging.getLogger(__name__)

PREFIX = "npyloader-"
SOCKET_NAME = "workers"
FALLBACK = "/tmp"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-[A-Za-z0-9_]+$")


def make() -> str:
    """A fresh folder for this server in $TMPDIR, after clearing those of dead servers there.

    An ipc socket path is limited to about 107 bytes (sun_path), so a long $TMPDIR falls back
    to /tmp rather than failing with ZeroMQ's bare 'path too long'."""
    parent = tempfile.gettempdir()
    if len(_socket_path(parent)) > zmq.IPC_PATH_MAX_LEN:
        log.info("TMPDIR %s is too long for an ipc socket path; using %s for the workers' socket", parent, FALLBACK)
        parent = FALLBACK
    remove_stale(parent)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)


def _socket_path(parent: str) -> str:
    """What the socket's path will be, with mkdtemp's 8 random characters."""
    return os.path.join(parent, f"{PREFIX}{os.getpid()}-{'x' * 8}", SOCKET_NAME)


def remove_stale(parent: str) -> list[str]:
    """Remove folders of servers whose pid no longer runs; returns what was removed."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for name in entries:
        match = _OWNED.match(name)
        path = os.path.join(parent, name)
        if match is None or _running(int(match.group(1))) or not _only_a_socket(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            log.info("removed %s, left behind by a server (pid %s) that was killed", path, match.group(1))
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _only_a_socket(path: str) -> bool:
    try:
        return os.path.isdir(path) and set(os.listdir(path)) <= {SOCKET_NAME}
    except OSError:
        return False
