"""The bench's batch plan, as every baseline delivers it: which samples, in which order, rotated how.

- all `wl.samples` samples per epoch, as batches of 64 `(x, y)`, x float32 (64, side, side),
  y float32 (64,);
- a per-sample shuffle: batch i of epoch e is `perm[64*i : 64*(i+1)]` with
  `perm = np.random.default_rng(e).permutation(samples)`;
- samples gathered row by row from memory maps (`np.load(path, mmap_mode="r")`, opened once per
  process), never by loading whole files;
- the workload's `rotate` augmentation per sample: a coin `rng.random() < p`, then an angle
  `rng.uniform(-degrees, degrees)`, from `np.random.default_rng([epoch, sample_id])`, applied with
  `scipy.ndimage.rotate(x, angle, reshape=False, order=...)`. The same work as npyloader's
  workers, not bit-identical output (npyloader seeds its generators differently).

Kept free of TensorFlow, Keras and torch: loaders that spawn their workers (Grain does) unpickle a
`PlanRowReader` there, and importing this module must not drag a training framework into each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from loader_server.data.augment import Rotate, build_pipeline
from loader_server.tools.bench.workload import ROWS_PER_FILE, Workload

BATCH = ROWS_PER_FILE
Batch = tuple[np.ndarray, np.ndarray]
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def read_header(path: Path) -> NpyHeader:
    """Shape, dtype and data offset of a C-ordered .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f"{path}: .npy format version {version} is not supported here")
        shape, fortran_order, dtype = NPY_HEADER_READERS[version](f)
        if fortran_order:
            raise ValueError(f"{path}: Fortran-ordered arrays cannot be gathered row by row")
        return NpyHeader(shape, dtype, f.tell())


def rotation_of(wl: Workload) -> Rotate | None:
    """The workload's rotate op, validated by npyloader's own parser (same defaults and checks)."""
    ops = build_pipeline(list(wl.augment), spatial_targets=False).ops
    if not ops:
        return None
    if len(ops) != 1 or not isinstance(ops[0], Rotate):
        raise ValueError(f"the baselines implement a single rotate op, not {list(wl.augment)}")
    return ops[0]


class PlanRowReader:
    """Gathers and augments the plan's samples from memory maps.

    Picklable (the maps are dropped and reopened), so a pool that spawns rather than forks can
    take it; a forked worker inherits the parent's maps instead of reopening them.
    """

    def __init__(self, folder: Path, wl: Workload) -> None:
        self.paths = sorted(Path(folder).glob("*.npy"))
        if not self.paths:
            raise FileNotFoundError(f"no .npy files in {folder}; write them with bench.write_files")
        rows = [self._rows(path, wl.side) for path in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(rows)])
        if self.starts[-1] != wl.samples or wl.samples % BATCH:
            raise ValueError(f"{folder} holds {self.starts[-1]} samples; the workload wants {wl.samples}, "
                             f"a multiple of {BATCH}")
        self.side = wl.side
        self.samples = wl.samples
        self.rotation = rotation_of(wl)
        self._perm: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self._maps = self._open()

    @staticmethod
    def _rows(path: Path, side: int) -> int:
        header = read_header(path)
        if header.dtype != np.dtype("<f4") or len(header.shape) != 2 or header.shape[1] != side * side + 1:
            raise ValueError(f"{path}: expected little-endian float32 rows of {side * side + 1} values, "
                             f"got {header.dtype} {header.shape}")
        return header.shape[0]

    def _open(self) -> list[np.ndarray]:
        return [np.load(path, mmap_mode="r") for path in self.paths]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = self._open()

    @property
    def num_batches(self) -> int:
        return self.samples // BATCH

    def permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._perm
        if cached_epoch != epoch:
            perm = np.random.default_rng(epoch).permutation(self.samples)
            self._perm = (epoch, perm)
        return perm

    def batch_ids(self, epoch: int, index: int) -> np.ndarray:
        """The sample ids of batch `index` of `epoch`, in the plan's order."""
        return self.permutation(epoch)[BATCH * index:BATCH * (index + 1)]

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch `index` of `epoch`: 64 rows gathered one by one, each augmented on its own."""
        ids = self.batch_ids(epoch, index)
        x = np.empty((len(ids), self.side, self.side), np.float32)
        y = np.empty(len(ids), np.float32)
        for j, sample_id in enumerate(ids):
            y[j] = self._read_into(int(sample_id), x[j])
            rotated = self.rotated(epoch, int(sample_id), x[j])
            if rotated is not None:
                x[j] = rotated
        return x, y

    def read(self, sample_id: int) -> tuple[np.ndarray, np.float32]:
        """One sample's features (a fresh array) and label, as stored."""
        x = np.empty((self.side, self.side), np.float32)
        return x, self._read_into(sample_id, x)

    def sample(self, epoch: int, sample_id: int) -> tuple[np.ndarray, np.float32]:
        x, y = self.read(sample_id)
        rotated = self.rotated(epoch, sample_id, x)
        return (x if rotated is None else rotated), y

    def _read_into(self, sample_id: int, out: np.ndarray) -> np.float32:
        """Copy one sample's features into `out` (one copy from the page cache); return its label."""
        f = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        row = self._maps[f][sample_id - self.starts[f]]
        out[...] = row[:-1].reshape(self.side, self.side)
        return row[-1]

    def rotated(self, epoch: int, sample_id: int, x: np.ndarray) -> np.ndarray | None:
        return rotated(self.rotation, epoch, sample_id, x)


def rotated(rot: Rotate | None, epoch: int, sample_id: int, x: np.ndarray) -> np.ndarray | None:
    """x rotated if the sample's coin says so, else None (x is then used as it is)."""
    if rot is None:
        return None
    rng = np.random.default_rng([epoch, sample_id])
    if rng.random() >= rot.p:
        return None
    angle = rng.uniform(-rot.degrees, rot.degrees)
    return ndimage.rotate(x, angle, reshape=False, order=rot.order, mode=rot.mode)
