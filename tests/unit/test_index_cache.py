"""The index cache: a restart reuses it, and any change to the files invalidates it."""

from __future__ import annotations

import logging
import os

import msgpack
import numpy as np

from loader_server.config import DatasetConfig
from loader_server.data.index import build_index
from loader_server.data.index_cache import load_or_build
from tests.helpers import write_id_dataset


def config(folder) -> DatasetConfig:
    return DatasetConfig(data=(str(folder / "*.npy"),), label_column=-1, x_shape=(4, 4))


def test_second_load_comes_from_the_cache_and_equals_a_fresh_index(tmp_path, caplog):
    write_id_dataset(tmp_path / "d", [10, 7, 5])
    cache = tmp_path / "cache"
    first = load_or_build(config(tmp_path / "d"), cache)
    with caplog.at_level(logging.INFO):
        second = load_or_build(config(tmp_path / "d"), cache)
    assert "from the index cache" in caplog.text
    assert second == first == build_index(config(tmp_path / "d"))
    assert second.fingerprint() == first.fingerprint()


def test_a_changed_added_or_removed_file_invalidates_the_cache(tmp_path, caplog):
    write_id_dataset(tmp_path / "d", [10, 7, 5])
    cache = tmp_path / "cache"
    load_or_build(config(tmp_path / "d"), cache)
    np.save(tmp_path / "d" / "part-001.npy", np.ones((9, 17), np.float32))
    assert load_or_build(config(tmp_path / "d"), cache).num_samples == 24
    np.save(tmp_path / "d" / "part-009.npy", np.ones((3, 17), np.float32))
    assert load_or_build(config(tmp_path / "d"), cache).num_samples == 27
    os.remove(tmp_path / "d" / "part-000.npy")
    with caplog.at_level(logging.INFO):
        assert load_or_build(config(tmp_path / "d"), cache).num_samples == 17
    assert "from the index cache" not in caplog.text


def test_a_damaged_cache_file_costs_a_reindex_not_the_start(tmp_path, caplog):
    write_id_dataset(tmp_path / "d", [10])
    cache = tmp_path / "cache"
    load_or_build(config(tmp_path / "d"), cache)
    for entry in cache.iterdir():
        entry.write_bytes(b"\x93not msgpack at all")
    with caplog.at_level(logging.WARNING):
        assert load_or_build(config(tmp_path / "d"), cache).num_samples == 10
    assert "unreadable index cache" in caplog.text


def test_a_file_rewritten_at_the_same_size_invalidates_the_cache_by_its_mtime(tmp_path, caplog):
    write_id_dataset(tmp_path / "d", [10, 7])
    cache = tmp_path / "cache"
    load_or_build(config(tmp_path / "d"), cache)
    part = tmp_path / "d" / "part-001.npy"
    before = os.stat(part)
    np.save(part, np.zeros((7, 17), np.float32))
    os.utime(part, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # a coarse clock could tie
    assert os.stat(part).st_size == before.st_size
    with caplog.at_level(logging.INFO):
        index = load_or_build(config(tmp_path / "d"), cache)
    assert "from the index cache" not in caplog.text
    assert index.stamps.mtimes_ns[1] == os.stat(part).st_mtime_ns


def test_a_cache_of_the_previous_format_is_rebuilt_not_misread(tmp_path, caplog):
    write_id_dataset(tmp_path / "d", [10])
    cache = tmp_path / "cache"
    load_or_build(config(tmp_path / "d"), cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(msgpack.packb({"format": 1, "files": [], "stamped": [], "stamps": [], "index": {}}))
    with caplog.at_level(logging.INFO):
        assert load_or_build(config(tmp_path / "d"), cache).num_samples == 10
    assert "from the index cache" not in caplog.text and "unreadable" not in caplog.text
