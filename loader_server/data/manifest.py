"""A dataset described for another host: what a joining remote worker is told, and its checks.

A remote worker reads the files itself (a shared volume, NFS, or a copy per host), so only
batches cross the network. The server tells a joining worker how each dataset is configured;
the worker rewrites the server's data root to its own (`--data-root`), indexes the files, and
compares its fingerprint with the server's. A worker that sees different data would serve
different batches under the same (epoch, index), so it is refused, and both sides log the
first file that differs.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from loader_client.protocol import ArraySpec
from loader_server.config import DatasetConfig
from loader_server.data.index import DatasetIndex

_GLOB_CHARS = "*?["
_PATH_KEYS = ("targets", "labels")


class DataMismatch(RuntimeError):
    """This worker's files differ from the server's; the message names the first difference."""


def _static_dir(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: every match lies below it."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=len(pattern))
    head = pattern[:cut]
    return head if cut == len(pattern) and os.path.isdir(head) else os.path.dirname(head)


def server_root(cfgs: dict[str, DatasetConfig], indexes: dict[str, DatasetIndex]) -> str:
    """The deepest folder holding every file and pattern of every dataset."""
    dirs = [os.path.dirname(os.path.abspath(p)) for ix in indexes.values() for p, _ in ix.file_sizes]
    for cfg in cfgs.values():
        patterns = [*cfg.data, *(getattr(cfg, k) for k in _PATH_KEYS if getattr(cfg, k))]
        dirs += [os.path.abspath(_static_dir(p)) or "/" for p in patterns]
    return os.path.commonpath(dirs)


def describe(cfgs: dict[str, DatasetConfig], indexes: dict[str, DatasetIndex],
             specs: dict[str, list[ArraySpec]]) -> dict[str, Any]:
    """The `setup` payload a joining worker needs: configs with absolute paths, fingerprints."""
    datasets = []
    for name, cfg in cfgs.items():
        config = asdict(cfg)
        config["data"] = [os.path.abspath(p) for p in cfg.data]
        for key in _PATH_KEYS:
            if config[key]:
                config[key] = os.path.abspath(config[key])
        datasets.append({
            "name": name, "config": config, "fingerprint": indexes[name].fingerprint(),
            "manifest": [list(row) for row in indexes[name].manifest()],
            "specs": [spec.to_wire() for spec in specs[name]],
        })
    return {"root": server_root(cfgs, indexes), "datasets": datasets}


def local_config(entry: dict[str, Any], root: str, data_root: str | None) -> DatasetConfig:
    """The server's config of one dataset with its root rewritten to this host's `--data-root`."""
    def remap(path: str) -> str:
        if data_root is None or not (path == root or path.startswith(root.rstrip("/") + "/")):
            return path
        return os.path.join(data_root, os.path.relpath(path, root))

    config = dict(entry["config"])
    config["data"] = tuple(remap(p) for p in config["data"])
    for key in _PATH_KEYS:
        if config.get(key):
            config[key] = remap(config[key])
    config["augment"] = tuple(config.get("augment") or ())
    if config.get("x_shape") is not None:
        config["x_shape"] = tuple(config["x_shape"])
    return DatasetConfig(**config)


def check_same_data(index: DatasetIndex, entry: dict[str, Any]) -> None:
    """Raise DataMismatch naming the first differing file unless the fingerprints agree."""
    if index.fingerprint() == entry["fingerprint"]:
        return
    mine = index.manifest()
    theirs = [tuple(row) for row in entry["manifest"]]
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            raise DataMismatch(
                f"dataset '{index.name}': file #{i} differs: this worker has {a[0]} ({a[1]} bytes), "
                f"the server has {b[0]} ({b[1]} bytes)")
    if len(mine) != len(theirs):
        extra = mine[len(theirs)] if len(mine) > len(theirs) else theirs[len(mine)]
        side = "this worker" if len(mine) > len(theirs) else "the server"
        raise DataMismatch(f"dataset '{index.name}': only {side} has {extra[0]} "
                           f"({len(mine)} files here, {len(theirs)} on the server)")
    raise DataMismatch(f"dataset '{index.name}': the same files and sizes, but array headers or "
                       "layout options differ (dtype, shape or label column)")
