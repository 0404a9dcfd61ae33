"""Write a small real dataset (scikit-learn's digits) and a ready loader.toml to try npyloader.

The files use the tutorial's combined layout, so the demo exercises the same path as real data:
several .npy parts per split, float32 rows whose last column is the label.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TRAIN_FRACTION = 0.8
CONFIG_NAME = "loader.toml"

_CONFIG = """\
# npyloader demo: scikit-learn's 8x8 digits, 64 pixels in [0, 1] then the label, per row.
# Relative paths below resolve against this file's folder.

[datasets.train]
data = "train/*.npy"
layout = "combined"
label_column = -1
x_shape = [8, 8, 1]
batch_size = 32
augment = ["rotate:degrees=10,p=0.5", "shift:pixels=1,p=0.5"]
seed = 0

[datasets.val]
data = "val/*.npy"
layout = "combined"
label_column = -1
x_shape = [8, 8, 1]
batch_size = 32
seed = 0
shuffle = false
"""


def write_demo_data(out_dir: str | Path, *, files_per_split: int = 4,
                    seed: int = 0) -> dict[str, Any]:
    """Write train/ and val/ parts plus loader.toml under out_dir; return counts and paths.

    Nothing is downloaded: the digits ship inside scikit-learn, an optional dependency.
    """
    if files_per_split < 1:
        raise ValueError(f"files_per_split must be at least 1, got {files_per_split}")
    rows = _digit_rows()
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    n_train = int(len(rows) * TRAIN_FRACTION)
    out = Path(out_dir)
    files = {
        "train": _write_split(out / "train", rows[:n_train], files_per_split),
        "val": _write_split(out / "val", rows[n_train:], files_per_split),
    }
    config = out / CONFIG_NAME
    config.write_text(_CONFIG)
    return {
        "out_dir": str(out),
        "config": str(config),
        "samples": {"train": n_train, "val": len(rows) - n_train},
        "files": {split: [str(p) for p in paths] for split, paths in files.items()},
    }


def _digit_rows() -> np.ndarray:
    """(1797, 65) float32: pixels scaled from 0..16 to [0, 1], then the digit as the last column."""
    log.info("loading scikit-learn's bundled digits (8x8 images of 0-9, 1,797 samples)")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError(
            "the demo data comes from scikit-learn, which is not installed: "
            "pip install 'npyloader[demo]'"
        ) from e
    digits = load_digits()
    return np.column_stack([digits.data / 16.0, digits.target]).astype(np.float32)


def _write_split(folder: Path, rows: np.ndarray, parts: int) -> list[Path]:
    """Replace any parts from an earlier run, which the split's glob would otherwise pick up."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("part-*.npy"):
        stale.unlink()
    paths = []
    for i, chunk in enumerate(np.array_split(rows, parts)):
        path = folder / f"part-{i:03d}.npy"
        np.save(path, chunk)
        paths.append(path)
    log.info("wrote %d samples in %d files under %s", len(rows), parts, folder)
    return paths
