"""A cache of dataset indexes, so a restart over many files skips reading their headers.

Indexing opens every file to read its `.npy` header: 100,000 opens for 100,000 files. The
cache keeps the index keyed by the dataset's options and trusts it only while the same glob
expansion finds the same files with the sizes and modification times they had, which costs
a directory listing and one stat per file. It is stored as msgpack, never pickle, because a
cache folder may be shared and loading it must not run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import msgpack

from loader_server.config import DatasetConfig
from loader_server.data.index import (
    ArraySource,
    DatasetIndex,
    SampleSpec,
    build_index,
    expand_files,
)

log = logging.getLogger(__name__)

FORMAT = 1


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npyloader"


def load_or_build(cfg: DatasetConfig, cache_dir: Path | None) -> DatasetIndex:
    """The dataset's index from the cache when every file is unchanged, else freshly built."""
    if cache_dir is None:
        return build_index(cfg)
    path = cache_dir / f"index-{_key(cfg)}.msgpack"
    listed = _listed_files(cfg)
    cached = _load(path)
    if cached is not None and cached["files"] == listed and cached["stamps"] == _stamps(cached["stamped"]):
        log.info("dataset '%s': %d samples from the index cache %s", cfg.name, cached["index"].num_samples, path)
        return cached["index"]
    index = build_index(cfg)
    _save(path, index, listed)
    return index


def _key(cfg: DatasetConfig) -> str:
    options = {k: v for k, v in asdict(cfg).items() if k not in ("name", "augment", "seed", "shuffle",
                                                                   "drop_remainder", "batch_size")}
    options["data"] = [os.path.abspath(p) for p in cfg.data]
    return hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:24]


def _listed_files(cfg: DatasetConfig) -> list[str]:
    """What the globs expand to now: a new or removed file invalidates the cache."""
    files = [p for pattern in cfg.data for p in expand_files(pattern)]
    if cfg.targets:
        files += expand_files(cfg.targets, "--targets")
    return files


def _stamps(paths: list[str]) -> list[list[int]]:
    try:
        return [[st.st_size, st.st_mtime_ns] for st in map(os.stat, paths)]
    except OSError:
        return []


def _save(path: Path, index: DatasetIndex, listed: list[str]) -> None:
    stamped = [p for p, _ in index.file_sizes]
    record = {"format": FORMAT, "files": listed, "stamped": stamped, "stamps": _stamps(stamped),
              "index": _plain(index)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(msgpack.packb(record, use_bin_type=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the index cache %s (%s); the next start indexes again", path, e)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        record = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
        if record.get("format") != FORMAT:
            return None
        return {**record, "index": _index(record["index"])}
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged cache costs one re-index, never the start
        log.warning("ignoring the unreadable index cache %s: %s", path, e)
        return None


_SOURCE_FIELDS = [f.name for f in fields(ArraySource)]


def _plain(index: DatasetIndex) -> dict[str, Any]:
    """The index as msgpack-able values; sources as flat lists (dataclasses.asdict is slow for 100k)."""
    def source(s: ArraySource | None) -> list | None:
        return None if s is None else [getattr(s, name) for name in _SOURCE_FIELDS]

    d = {f.name: getattr(index, f.name) for f in fields(DatasetIndex)}
    d["spec"] = asdict(index.spec)
    d["x_sources"] = [source(s) for s in index.x_sources]
    d["y_sources"] = None if index.y_sources is None else [source(s) for s in index.y_sources]
    d["labels"] = source(index.labels)
    return d


def _index(d: dict[str, Any]) -> DatasetIndex:
    def source(s: list | None) -> ArraySource | None:
        if s is None:
            return None
        values = dict(zip(_SOURCE_FIELDS, s))
        return ArraySource(**{**values, "shape": tuple(values["shape"])})

    def opt_tuple(v: list | None) -> tuple | None:
        return None if v is None else tuple(v)

    spec = d["spec"]
    values = {
        **d,
        "spec": SampleSpec(**{**spec, "x_shape": tuple(spec["x_shape"]), "y_shape": opt_tuple(spec["y_shape"])}),
        "x_sources": tuple(source(s) for s in d["x_sources"]),
        "row_starts": tuple(d["row_starts"]),
        "y_sources": None if d["y_sources"] is None else tuple(source(s) for s in d["y_sources"]),
        "labels": source(d["labels"]),
        "x_shape": opt_tuple(d["x_shape"]),
        "file_sizes": tuple((p, s) for p, s in d["file_sizes"]),
    }
    return DatasetIndex(**{f.name: values[f.name] for f in fields(DatasetIndex)})
