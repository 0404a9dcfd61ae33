"""The private ipc folder's stale-folder cleanup, on folders made by hand: only a dead server's
own socket folder is removed (the live-server side: tests/live/test_shutdown.py)."""

from __future__ import annotations

import os

from loader_server.shm import ipc_dir


def test_stale_folder_cleanup_touches_only_dead_servers_socket_folders(tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max's default range: no such process
    stale = tmp_path / f"{ipc_dir.PREFIX}{dead_pid}-abc"
    stale.mkdir()
    (stale / ipc_dir.SOCKET_NAME).touch()
    live = tmp_path / f"{ipc_dir.PREFIX}{os.getpid()}-def"
    live.mkdir()
    other_content = tmp_path / f"{ipc_dir.PREFIX}{dead_pid}-ghi"
    other_content.mkdir()
    (other_content / "notes.txt").write_text("not ours")
    unrelated = tmp_path / f"{ipc_dir.PREFIX}docker"
    unrelated.mkdir()

    assert ipc_dir.remove_stale(str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_content.name, unrelated.name])
