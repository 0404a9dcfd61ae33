"""A cache of dataset indexes, so a restart over many files skips reading their headers.

Indexing opens every file to read its `.npy` header: 100,000 opens for 100,000 files. The
cache keeps the index keyed by the dataset's options and trusts it only while the same glob
expansion finds the same files with the sizes and modification times they had when their
headers were read, which costs a directory listing and one stat per file. It is stored as
msgpack, never pickle, because a cache folder may be shared and loading it must not run code;
the index's file tables are stored column by column (paths, a few distinct placements, one
small int per file), so loading 100,000 files' worth takes hundredths of a second.
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
    FileStamps,
    Placement,
    SampleSpec,
    SourceTable,
    build_index,
    expand_files,
)

log = logging.getLogger(__name__)

FORMAT = 2


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npyloader"


def load_or_build(cfg: DatasetConfig, cache_dir: Path | None) -> DatasetIndex:
    """The dataset's index from the cache when every file is unchanged, else freshly built."""
    if cache_dir is None:
        return build_index(cfg)
    path = cache_dir / f"index-{_key(cfg)}.msgpack"
    listed = _listed_files(cfg)
    cached = _load(path)
    if cached is not None and cached[0] == listed and _unchanged(cached[1].stamps):
        log.info("dataset '%s': %d samples from the index cache %s", cfg.name, cached[1].num_samples, path)
        return cached[1]
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


def _unchanged(stamps: FileStamps) -> bool:
    """Every file still has the size and modification time its header was read at."""
    try:
        for path, size, mtime_ns in zip(stamps.paths, stamps.sizes, stamps.mtimes_ns):
            st = os.stat(path)
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return False
    except OSError:
        return False
    return True


def _save(path: Path, index: DatasetIndex, listed: list[str]) -> None:
    record = {"format": FORMAT, "files": listed, "index": _plain(index)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(msgpack.packb(record, use_bin_type=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the index cache %s (%s); the next start indexes again", path, e)


def _load(path: Path) -> tuple[list[str], DatasetIndex] | None:
    """(the listing the index was built from, the index), or None when there is no usable cache."""
    try:
        record = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
        if record.get("format") != FORMAT:
            return None
        return record["files"], _index(record["index"])
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged cache costs one re-index, never the start
        log.warning("ignoring the unreadable index cache %s: %s", path, e)
        return None


def _plain(index: DatasetIndex) -> dict[str, Any]:
    """The index as msgpack-able values: tables and stamps by column, sources as flat lists."""
    def table(t: SourceTable | None) -> dict[str, Any] | None:
        return None if t is None else {"paths": t.paths, "placements": t.placements, "placement_of": t.placement_of}

    d = {f.name: getattr(index, f.name) for f in fields(DatasetIndex)}
    d["spec"] = asdict(index.spec)
    d["x_sources"] = table(index.x_sources)
    d["y_sources"] = table(index.y_sources)
    d["labels"] = None if index.labels is None else [getattr(index.labels, f.name) for f in fields(ArraySource)]
    d["stamps"] = {f.name: getattr(index.stamps, f.name) for f in fields(FileStamps)}  # asdict copies every item
    return d


def _index(d: dict[str, Any]) -> DatasetIndex:
    def placement(p: list) -> Placement:
        return Placement(*p[:3], tuple(p[3]), *p[4:])

    def table(t: dict[str, Any] | None) -> SourceTable | None:
        if t is None:
            return None
        return SourceTable(tuple(t["paths"]), tuple(map(placement, t["placements"])), tuple(t["placement_of"]))

    def opt_tuple(v: list | None) -> tuple | None:
        return None if v is None else tuple(v)

    spec, labels, stamps = d["spec"], d["labels"], d["stamps"]
    values = {
        **d,
        "spec": SampleSpec(**{**spec, "x_shape": tuple(spec["x_shape"]), "y_shape": opt_tuple(spec["y_shape"])}),
        "x_sources": table(d["x_sources"]),
        "row_starts": tuple(d["row_starts"]),
        "y_sources": table(d["y_sources"]),
        "labels": None if labels is None else ArraySource(labels[0], *placement(labels[1:])),
        "x_shape": opt_tuple(d["x_shape"]),
        "stamps": FileStamps(*(tuple(stamps[f.name]) for f in fields(FileStamps))),
    }
    return DatasetIndex(**{f.name: values[f.name] for f in fields(DatasetIndex)})
