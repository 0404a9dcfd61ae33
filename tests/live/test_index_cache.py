"""The index cache across real restarts of `npyloader serve` (the cache's own logic, without a
server: tests/unit/test_index_cache.py)."""

from __future__ import annotations

import os

import numpy as np

from tests.helpers import ids_of, read_epoch, write_id_dataset

FROM_CACHE = "from the index cache"


def test_a_restart_reindexes_files_rewritten_to_the_same_size(start_server, tmp_path):
    """The cache is trusted while every file keeps its size and modification time. Rewritten in
    place as int32 instead of float32, the files keep their sizes (same header length, same bytes
    per row): only their mtimes move. The restart must index them again and serve int32 rows;
    a stale index would serve the new bytes as float32 (garbage ids)."""
    folder = tmp_path / "d"
    n = write_id_dataset(folder, [40, 24])
    args = ("--data", str(folder), "--label-column", "-1", "--batch-size", "16", "--index-cache", str(tmp_path / "cache"))
    start_server(*args, workers=1).stop()
    cached = start_server(*args, workers=1)
    assert FROM_CACHE in cached.log(), "an unchanged dataset comes from the cache, so the check below can fail"
    cached.stop()

    files = sorted(folder.glob("*.npy"))
    before = {f: f.stat() for f in files}
    write_id_dataset(folder, [40, 24], dtype="int32")
    for f in files:
        assert f.stat().st_size == before[f].st_size, "the rewrite keeps every file's size"
        later = before[f].st_mtime_ns + 5_000_000_000  # a move any filesystem's timestamps can show
        os.utime(f, ns=(later, later))

    server = start_server(*args, workers=1)
    assert FROM_CACHE not in server.log(), server.log()
    batches = read_epoch(server.endpoint)
    assert {b[0].dtype for b in batches} == {np.dtype(np.int32)}
    assert sorted(ids_of(batches)) == list(range(n))
    for x, y in batches:
        np.testing.assert_array_equal(x[:, 0], (y.astype(np.int64) * 1000) % 9973)
