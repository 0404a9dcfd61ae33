"""Scans with masks through a real server: geometric augmentation moves a mask exactly as it
moves its scan, and the mask stays 0/1 (nearest neighbour), whatever the scan's interpolation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import read_epoch


def geometric(order: int) -> list[str]:
    """Every geometric op, the interpolating ones (rotate, zoom) at spline `order` for the scan."""
    return [f"rotate:degrees=40,p=1,order={order}", "flip:axis=0,p=0.5", "shift:pixels=3,p=1",
            f"zoom:range=0.2,p=1,order={order}"]


def write_masked_scans(folder: Path, count: int, size: int = 32, mask_dtype: str = "uint8") -> np.ndarray:
    """Per-sample scans that are their own mask as float32, and the masks as `mask_dtype` files
    of the same names. Each mask is a disc plus an off-centre bar, so no flip or rotation maps it onto
    itself and a transform applied to one but not the other shows."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for i in range(count):
        cy, cx = rng.integers(10, size - 10, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(3, 7) ** 2).astype(np.uint8)
        mask[3:6, 4:4 + rng.integers(5, 12)] = 1
        for sub, array in (("scans", mask.astype(np.float32)), ("masks", mask.astype(mask_dtype))):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            np.save(folder / sub / f"scan-{i:03d}.npy", array)
        masks.append(mask)
    return np.stack(masks)


def serve_masked_scans(start_server, folder: Path, augment: list[str]) -> tuple[np.ndarray, np.ndarray]:
    args = ["--data", str(folder / "scans"), "--layout", "per-sample", "--targets", str(folder / "masks" / "*.npy"),
            "--batch-size", "8", "--seed", "5"]
    for spec in augment:
        args += ["--augment", spec]
    server = start_server(*args, workers=1)
    batches = read_epoch(server.endpoint)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_nearest_neighbour_scan_and_mask_get_exactly_the_same_transform(start_server, tmp_path):
    originals = write_masked_scans(tmp_path, 24)
    scans, masks = serve_masked_scans(start_server, tmp_path, geometric(order=0))
    assert masks.dtype == np.uint8 and masks.shape == scans.shape == (24, 32, 32)
    np.testing.assert_array_equal(scans, masks.astype(np.float32))
    unchanged = sum(any(np.array_equal(m, o) for o in originals) for m in masks)
    assert unchanged == 0, f"{unchanged} of 24 masks came back untransformed"


# float32 masks show interpolation at once (uint8 ones are rounded back to integers either way)
@pytest.mark.parametrize(("order", "mask_dtype"), [(1, "float32"), (3, "float32"), (1, "uint8")])
def test_masks_stay_binary_and_follow_an_interpolated_scan(start_server, tmp_path, order, mask_dtype):
    write_masked_scans(tmp_path, 24, mask_dtype=mask_dtype)
    scans, masks = serve_masked_scans(start_server, tmp_path, geometric(order))
    assert masks.dtype == mask_dtype
    assert set(np.unique(masks)) <= {0, 1}
    assert set(np.unique(scans)) - {0.0, 1.0}, "the scan was interpolated, not nearest-neighbour"
    # an interpolated edge may fall either side of 0.5; anything more is a different transform
    agree = ((scans > 0.5) == (masks == 1)).mean(axis=(1, 2))
    assert agree.min() > 0.97, agree
