"""The soak's own datasets: each sample's label is its global id and its pixels are a known
function of that id.

With the id in the label column a client counts every sample of every epoch (nothing lost,
nothing twice); with pixels computable from the id it checks that a batch holds the bytes of
the samples it claims to, which a stopped worker waking up to write into a reused slot, or a
batch routed to the wrong request, would break.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDE = 64
ROWS_PER_FILE = 128


@dataclass(frozen=True)
class SoakDataset:
    """One served dataset: size, batching and augmentation, as written into the TOML config."""

    name: str
    samples: int
    batch_size: int
    augment: tuple[str, ...]
    shuffle: bool
    seed: int = 0

    @property
    def batches(self) -> int:
        return -(-self.samples // self.batch_size)


# `train` costs real CPU per batch (a rotation of half its 64x64 images) and is shuffled per
# sample; `val` is served in file order without augmentation, so every pixel can be checked.
TRAIN = SoakDataset("train", 2048, 32, ("rotate:degrees=15,p=0.5",), shuffle=True)
VAL = SoakDataset("val", 512, 32, (), shuffle=False)
DATASETS = {d.name: d for d in (TRAIN, VAL)}


def pixels(ids: np.ndarray) -> np.ndarray:
    """The images of samples `ids`, shape (len(ids), SIDE, SIDE) float32, exact in float32."""
    k = np.arange(SIDE * SIDE, dtype=np.int64)
    values = (np.asarray(ids, dtype=np.int64)[:, None] * 7919 + k[None, :]) % 9973
    return values.astype(np.float32).reshape(-1, SIDE, SIDE)


def write(folder: Path, train_ops: tuple[str, ...] = ()) -> Path:
    """Write every dataset as combined-layout files (pixels, then the id as the last column)
    under `folder`, and a TOML config serving them all; returns the config's path. `train_ops`
    are appended to `train`'s augmentation: ops that leave the bytes alone (the soak's hang op)."""
    tables = []
    for ds in DATASETS.values():
        target = folder / ds.name
        target.mkdir(parents=True, exist_ok=True)
        for part, start in enumerate(range(0, ds.samples, ROWS_PER_FILE)):
            ids = np.arange(start, min(start + ROWS_PER_FILE, ds.samples))
            rows = np.column_stack([pixels(ids).reshape(len(ids), -1), ids.astype(np.float32)])
            np.save(target / f"part-{part:03d}.npy", rows)
        ops = ds.augment + (train_ops if ds is TRAIN else ())
        augment = ", ".join(f'"{op}"' for op in ops)
        tables.append(f"[datasets.{ds.name}]\n"
                      f'data = "{ds.name}/*.npy"\n'
                      'layout = "combined"\n'
                      "label_column = -1\n"
                      f"x_shape = [{SIDE}, {SIDE}]\n"
                      f"batch_size = {ds.batch_size}\n"
                      f"seed = {ds.seed}\n"
                      f"shuffle = {'true' if ds.shuffle else 'false'}\n"
                      f"augment = [{augment}]\n")
    config = folder / "loader.toml"
    config.write_text("\n".join(tables))
    return config
