"""Full disks are reported, not swallowed: a /dev/shm too small for the batch slots stops the
server at startup naming the shortage, and an index cache that cannot be written is a warning.

Each case runs the server in a private mount namespace with a tiny tmpfs (root and unshare
needed; skipped saying so elsewhere), so the machine's own /dev/shm is never filled.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from loader_client import BatchStream
from tests.helpers import wait_for, write_id_dataset


def tiny_tmpfs(mountpoint: str, fill: bool) -> tuple[str, ...]:
    """A command prefix: a new mount namespace with a 64 KiB tmpfs at `mountpoint` (filled up
    when `fill`), then the server command itself."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here (needs root): {probe.stderr.strip()}")
    script = f'mount -t tmpfs -o size=64k tmpfs "{mountpoint}"'
    if fill:
        script += f' && {{ cat /dev/zero > "{mountpoint}/filler" 2>/dev/null; true; }}'
    return ("unshare", "--mount", "sh", "-c", script + ' && exec "$@"', "sh")


def test_a_dev_shm_too_small_for_the_batch_slots_stops_startup_with_what_to_do(start_server, tmp_path):
    write_id_dataset(tmp_path / "d", [64])
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--batch-size", "64",
                          expect_ready=False, prefix=tiny_tmpfs("/dev/shm", fill=False))
    assert server.proc.wait(60) == 2, server.log()
    line = server.log().strip().splitlines()[-1]
    assert line.startswith("npyloader serve: error: dataset 'train': not enough shared memory"), line
    assert "/dev/shm" in line and "--shm-size" in line and "--batch-size" in line, line


def test_an_index_cache_on_a_full_disk_is_a_warning_and_serving_goes_on(start_server, tmp_path):
    n = write_id_dataset(tmp_path / "d", [40, 40])
    cache = tmp_path / "cache"
    cache.mkdir()
    server = start_server("--data", str(tmp_path / "d"), "--label-column", "-1", "--index-cache", str(cache),
                          workers=1, prefix=tiny_tmpfs(str(cache), fill=True))
    wait_for(lambda: "could not write the index cache" in server.log(), 10, "the warning")
    assert "No space left on device" in server.log()
    with BatchStream(server.endpoint, timeout=30) as stream:
        assert sorted(int(i) for _, y in stream for i in y) == list(range(n))
    assert not any(Path(cache).iterdir()), "the namespace's tmpfs never reached the real folder"
