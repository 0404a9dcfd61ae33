"""The bench's workloads and the files every loader reads: the same bytes for every contender.

Kept apart from the runner and the baselines so each imports it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loader_server.progress import Progress

ROWS_PER_FILE = 64

@dataclass(frozen=True)
class Workload:
    name: str
    side: int
    samples: int
    augment: tuple[str, ...]

    @property
    def sample_bytes(self) -> int:
        return self.side * self.side * 4


WORKLOADS = {
    "io": Workload("io", 128, 4096, ()),
    "aug": Workload("aug", 64, 4096, ("rotate:degrees=15,p=0.5,order=3",)),
}


def write_files(folder: Path, wl: Workload) -> None:
    """Combined layout, as in the tutorial: features then the label as the last column."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with Progress(f"bench: writing {folder.name} files", wl.samples // ROWS_PER_FILE, "files") as progress:
        for i in range(wl.samples // ROWS_PER_FILE):
            rows = rng.random((ROWS_PER_FILE, wl.side * wl.side + 1), dtype=np.float32)
            rows[:, -1] = rng.integers(0, 10, ROWS_PER_FILE)
            np.save(folder / f"part-{i:04d}.npy", rows)
            progress.advance()


def write_small_files(folder: Path, count: int) -> None:
    """One 8x8 sample per file, the case where indexing cost is per file."""
    folder.mkdir(parents=True, exist_ok=True)
    sample = np.zeros((8, 8), np.float32)
    with Progress("bench: writing one-sample files", count, "files") as progress:
        for i in range(count):
            sample[0, 0] = i
            np.save(folder / f"s{i:06d}.npy", sample)
            progress.advance()
    np.save(folder.parent / "small-labels.npy", np.arange(count) % 10)
