"""Synthetic "scans" with masks, one `.npy` per scan and one per mask, as a scanner's export is.

Each scan is a single-channel float32 image of bright shapes (discs, squares, ellipses,
triangles) on a smoothly varying background with heavy noise; its mask marks the shapes' pixels
(uint8, 0 or 1). The noise makes a fixed threshold a poor segmenter, so what the model learns is
shape, not brightness. Scan `i` of a split depends only on (seed, split, i).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("disc", "square", "ellipse", "triangle")


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    radius = rng.uniform(0.08, 0.18) * size
    cy, cx = rng.uniform(radius + 2, size - radius - 2, size=2)
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dy ** 2 + dx ** 2 <= radius ** 2
    angle = rng.uniform(0, np.pi)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "square":
        return (np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85)
    if kind == "ellipse":
        return (u / radius) ** 2 + (v / (radius * rng.uniform(0.4, 0.7))) ** 2 <= 1
    # triangle: three half-planes 120 degrees apart around the centre
    normals = [angle + k * 2 * np.pi / 3 for k in range(3)]
    return np.all([dx * np.cos(a) + dy * np.sin(a) <= radius * 0.6 for a in normals], axis=0)


def make_scan(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scan and its mask."""
    mask = np.zeros((size, size), dtype=bool)
    scan = np.zeros((size, size), dtype=np.float32)
    for _ in range(rng.integers(1, 4)):
        shape = _shape_mask(SHAPES[rng.integers(len(SHAPES))], size, rng)
        scan[shape] = rng.uniform(0.6, 1.2)
        mask |= shape
    yy, xx = np.mgrid[:size, :size] / size
    background = rng.uniform(-0.3, 0.3) * yy + rng.uniform(-0.3, 0.3) * xx
    scan += background.astype(np.float32) + rng.normal(0.0, 0.45, (size, size)).astype(np.float32)
    return scan, mask.astype(np.uint8)


def write_split(folder: Path, count: int, size: int, seed: int, split: int) -> None:
    """`folder/scans/scan-NNNN.npy` and `folder/masks/scan-NNNN.npy` (same names: the server pairs
    targets with inputs by file name)."""
    for sub in ("scans", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scan, mask = make_scan(size, np.random.default_rng([seed, split, i]))
        np.save(folder / "scans" / f"scan-{i:04d}.npy", scan)
        np.save(folder / "masks" / f"scan-{i:04d}.npy", mask)
