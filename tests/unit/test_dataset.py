"""Tests for loader_server.data.index: real files in tmp_path, read back and compared with np.load."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from loader_server.config import ConfigError, DatasetConfig
from loader_server.data.index import (
    DEFAULT_MAX_OPEN,
    DatasetError,
    DatasetIndex,
    SampleSpec,
    build_index,
    read_source,
)
from loader_server.data.reader import SampleReader


def config(*data: Path | str, **options: object) -> DatasetConfig:
    return DatasetConfig(data=tuple(str(d) for d in data), **options)  # type: ignore[arg-type]


def save(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return array


def read_all(index: DatasetIndex) -> list[tuple[np.ndarray, np.ndarray | None]]:
    with SampleReader(index) as reader:
        return [reader.read(i) for i in range(index.num_samples)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- combined -------------------------------------------------------------------------------


def test_combined_rows_across_files_in_order(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = [save(tmp_path / f"d/{i}.npy", rng.random((n, 4, 3)).astype(np.float32))
             for i, n in enumerate([3, 0, 5])]
    index = build_index(config(tmp_path / "d/*.npy"))
    expected = np.concatenate(parts)
    assert index.num_samples == 8
    assert index.spec == SampleSpec("<f4", (4, 3), None, None, False)
    for i, (x, y) in enumerate(read_all(index)):
        assert y is None
        np.testing.assert_array_equal(x, expected[i])


def test_combined_label_column_and_x_shape(tmp_path: Path, rng: np.random.Generator) -> None:
    rows = rng.random((6, 17)).astype(np.float64)
    rows[:, -1] = np.arange(6)
    save(tmp_path / "rows.npy", rows)
    index = build_index(config(tmp_path / "rows.npy", label_column=-1, x_shape=(4, 4)))
    assert index.spec == SampleSpec("<f8", (4, 4), "<f8", (), False)
    for i, (x, y) in enumerate(read_all(index)):
        np.testing.assert_array_equal(x, rows[i, :16].reshape(4, 4))
        assert y is not None and y.shape == () and y.dtype == np.float64 and y == i


def test_combined_positive_label_column(tmp_path: Path) -> None:
    rows = save(tmp_path / "r.npy", np.arange(12, dtype=np.int32).reshape(3, 4))
    x, y = read_all(build_index(config(tmp_path / "r.npy", label_column=1)))[2]
    np.testing.assert_array_equal(x, rows[2, [0, 2, 3]])
    assert y == rows[2, 1]


def test_fortran_order_and_big_endian(tmp_path: Path, rng: np.random.Generator) -> None:
    f_rows = save(tmp_path / "a.npy", np.asfortranarray(rng.random((5, 3)).astype(">f4")))
    c_rows = save(tmp_path / "b.npy", rng.random((2, 3)).astype(">f4"))
    index = build_index(config(tmp_path))
    assert index.x_sources[0].fortran_order
    expected = np.concatenate([f_rows, c_rows])
    for i, (x, _) in enumerate(read_all(index)):
        np.testing.assert_array_equal(x, expected[i])


def test_x_shape_with_wrong_size(tmp_path: Path) -> None:
    save(tmp_path / "r.npy", np.zeros((2, 65), np.float32))
    message = r"r\.npy: --x-shape \(9, 7\) has 63 elements but its samples have 64"
    with pytest.raises(DatasetError, match=message):
        build_index(config(tmp_path / "r.npy", label_column=-1, x_shape=(9, 7)))


@pytest.mark.parametrize("column", [5, -6])
def test_label_column_out_of_range(tmp_path: Path, column: int) -> None:
    save(tmp_path / "r.npy", np.zeros((2, 5)))
    with pytest.raises(DatasetError, match=r"r\.npy.*5 columns"):
        build_index(config(tmp_path / "r.npy", label_column=column))


def test_label_column_needs_2d_files(tmp_path: Path) -> None:
    save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DatasetError, match=r"cube\.npy.*2-D"):
        build_index(config(tmp_path / "cube.npy", label_column=0))


def test_combined_refuses_targets(tmp_path: Path) -> None:
    save(tmp_path / "r.npy", np.zeros((2, 5)))
    with pytest.raises(ConfigError, match="--targets"):
        build_index(config(tmp_path / "r.npy", targets=str(tmp_path / "r.npy")))


# --- headers --------------------------------------------------------------------------------


def save_with_header(path: Path, array: np.ndarray, version: tuple[int, int]) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)
    return array


def save_padded(path: Path, array: np.ndarray, header_bytes: int) -> None:
    """A version 1.0 .npy file whose header is padded with spaces to `header_bytes`: legal, and
    numpy reads it, up to its own 10,000-byte limit."""
    text = repr({"descr": array.dtype.str, "fortran_order": False, "shape": array.shape}).encode("latin1")
    text += b" " * (header_bytes - len(text) - 1) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + array.tobytes())


@pytest.mark.parametrize("dtype", ["|u1", ">i2", "<f4", "<f8", "<c8", "|b1"])
@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)])
def test_one_sample_files_with_mixed_headers_read_back_as_numpy_loads_them(
        tmp_path: Path, rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> None:
    """Version 1.0 and 2.0 headers, C and Fortran order, runs of equal headers and changes:
    every sample reads back as np.load reads its file."""
    headers = [((1, 0), False), ((1, 0), False), ((2, 0), False), ((1, 0), True), ((2, 0), True),
               ((2, 0), True), ((1, 0), False)]
    for i, (version, fortran) in enumerate(headers):
        array = (rng.random(shape) * 100).astype(dtype)
        save_with_header(tmp_path / f"s/{i}.npy", np.asfortranarray(array) if fortran else array, version)
    index = build_index(config(tmp_path / "s", layout="per-sample"))
    for i, (x, _) in enumerate(read_all(index)):
        np.testing.assert_array_equal(x, np.load(tmp_path / f"s/{i}.npy"))
        assert x.dtype == np.dtype(dtype)


def test_a_header_longer_than_one_read_is_read_whole(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_padded(tmp_path / "long.npy", array, header_bytes=9000)
    index = build_index(config(tmp_path / "long.npy"))
    assert index.x_sources[0].offset == 10 + 9000
    np.testing.assert_array_equal(np.stack([x for x, _ in read_all(index)]), array)


def test_a_header_longer_than_numpy_allows_is_refused(tmp_path: Path) -> None:
    save_padded(tmp_path / "huge-header.npy", np.zeros(3, np.float32), header_bytes=20_000)
    with pytest.raises(DatasetError, match=r"huge-header\.npy is not a valid \.npy file"):
        build_index(config(tmp_path / "huge-header.npy"))


def test_files_sharing_a_header_share_one_placement_and_are_stamped(tmp_path: Path) -> None:
    """100,000 such files cost one parsed header and one small int each; every file's size and
    mtime are recorded as they were when its header was read."""
    for i in range(50):
        save(tmp_path / f"s/{i:02d}.npy", np.full((2, 2), i, np.int32))
    save(tmp_path / "labels.npy", np.arange(50))
    index = build_index(config(tmp_path / "s", layout="per-sample", labels=str(tmp_path / "labels.npy")))
    assert len(index.x_sources) == 50 and len(index.x_sources.placements) == 1
    paths = [str(tmp_path / f"s/{i:02d}.npy") for i in range(50)] + [str(tmp_path / "labels.npy")]
    assert index.stamps.paths == tuple(paths)
    assert index.stamps.sizes == tuple(os.stat(p).st_size for p in paths)
    assert index.stamps.mtimes_ns == tuple(os.stat(p).st_mtime_ns for p in paths)
    assert [s.path for s in index.x_sources] == paths[:-1]


# --- file lists -----------------------------------------------------------------------------


def test_folder_means_npy_and_npz_directly_inside_and_duplicates_go(tmp_path: Path) -> None:
    save(tmp_path / "d/b.npy", np.ones((2, 2)))
    np.savez(tmp_path / "d/a.npz", x=np.zeros((3, 2)))
    save(tmp_path / "d/sub/c.npy", np.ones((4, 2)))
    (tmp_path / "d/notes.txt").write_text("not data")
    index = build_index(config(tmp_path / "d", tmp_path / "d/*.np?", tmp_path / "d/**/*.npy"))
    names = [Path(s.path).name for s in index.x_sources]
    assert names == ["a.npz", "b.npy", "c.npy"]
    assert index.num_samples == 9


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing/*.npy")
    with pytest.raises(DatasetError, match=re.escape(pattern) + ".*quote"):
        build_index(config(pattern))


def test_folder_without_arrays(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no \.npy or \.npz"):
        build_index(config(tmp_path / "empty"))


def test_files_with_no_rows_at_all(tmp_path: Path) -> None:
    save(tmp_path / "none.npy", np.zeros((0, 3)))
    with pytest.raises(DatasetError, match="no samples"):
        build_index(config(tmp_path / "none.npy"))


# --- bad files ------------------------------------------------------------------------------


def test_not_a_npy_file(tmp_path: Path) -> None:
    (tmp_path / "text.npy").write_text("hello, I am a CSV file\n1,2,3\n")
    with pytest.raises(DatasetError, match=r"text\.npy is not a valid \.npy file.*numpy\.save"):
        build_index(config(tmp_path / "text.npy"))


@pytest.mark.parametrize("keep", [3, 9, 20, 60])
def test_truncated_header(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((4, 4)))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(DatasetError, match=r"cut\.npy is not a valid \.npy file"):
        build_index(config(path))


def test_data_shorter_than_header_says(tmp_path: Path) -> None:
    path = tmp_path / "short.npy"
    np.save(path, np.zeros((10, 4), np.float32))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(DatasetError, match=r"short\.npy is truncated.*160 data bytes.*10 are missing"):
        build_index(config(path))


def test_indexing_reads_headers_only(tmp_path: Path) -> None:
    """A 4 GiB array written sparsely (no data blocks) indexes and reads like a small one;
    loading it would need 4 GiB. Cutting its data is still caught, from the header's promise."""
    path = tmp_path / "huge.npy"
    shape = (2**28, 4)
    with open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + 2**32)
    index = build_index(config(path))
    assert index.num_samples == 2**28
    with SampleReader(index) as reader:
        x, _ = reader.read(2**28 - 1)
    np.testing.assert_array_equal(x, np.zeros(4, np.float32))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 16)
    with pytest.raises(DatasetError, match=r"huge\.npy is truncated"):
        build_index(config(path))


def test_object_dtype_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"obj\.npy has dtype object; npyloader never unpickles"):
        build_index(config(path))


@pytest.mark.parametrize("array", [
    np.array(["ab", "cd"]),
    np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
    np.array(["2020-01-01"], dtype="datetime64[D]"),
], ids=["unicode", "structured", "datetime"])
def test_non_numeric_dtypes_are_refused(tmp_path: Path, array: np.ndarray) -> None:
    save(tmp_path / "odd.npy", array)
    with pytest.raises(DatasetError, match=r"odd\.npy has dtype .*not numeric or bool"):
        build_index(config(tmp_path / "odd.npy"))


def test_dtype_disagreement_names_both_files(tmp_path: Path) -> None:
    save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    save(tmp_path / "b.npy", np.zeros((2, 3), np.float64))
    with pytest.raises(DatasetError, match=r"b\.npy has dtype float64 but .*a\.npy has float32"):
        build_index(config(tmp_path))


def test_sample_shape_disagreement_names_both_files(tmp_path: Path) -> None:
    save(tmp_path / "a.npy", np.zeros((2, 3)))
    save(tmp_path / "b.npy", np.zeros((2, 4)))
    message = r"b\.npy has samples of shape \(4,\) but .*a\.npy has \(3,\)"
    with pytest.raises(DatasetError, match=message):
        build_index(config(tmp_path))


def test_zero_d_file_in_combined_layout(tmp_path: Path) -> None:
    save(tmp_path / "scalar.npy", np.float32(3))
    with pytest.raises(DatasetError, match=r"scalar\.npy.*per-sample"):
        build_index(config(tmp_path / "scalar.npy"))


# --- paired ---------------------------------------------------------------------------------


def test_paired_matches_by_stem_before_order(tmp_path: Path, rng: np.random.Generator) -> None:
    b = save(tmp_path / "in/b.npy", rng.random((2, 3)))
    a = save(tmp_path / "in/a.npy", rng.random((3, 3)))
    mask_a = save(tmp_path / "masks/a.npy", rng.random((3, 2)))
    mask_b = save(tmp_path / "masks/b.npy", rng.random((2, 2)))
    # Data entries keep their given order (b, then a); targets sort (a, b); stems decide.
    index = build_index(config(tmp_path / "in/b.npy", tmp_path / "in/a.npy", layout="paired",
                               targets=str(tmp_path / "masks/*.npy")))
    assert index.y_sources is not None
    assert [Path(s.path).name for s in index.y_sources] == ["b.npy", "a.npy"]
    samples = read_all(index)
    for (x, y), ex, ey in zip(samples, np.concatenate([b, a]), np.concatenate([mask_b, mask_a])):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    assert index.spec.spatial_targets is False  # 1-D targets are not images


def test_paired_matches_by_sorted_order_when_stems_differ(tmp_path: Path,
                                                          rng: np.random.Generator) -> None:
    images = [save(tmp_path / f"images/img_{i}.npy", rng.random((i + 1, 48)).astype(np.float32))
              for i in range(3)]
    masks = [save(tmp_path / f"masks/mask_{i}.npy", rng.integers(0, 2, (i + 1, 4, 4), dtype=np.uint8))
             for i in range(3)]
    index = build_index(config(tmp_path / "images", layout="paired", targets=str(tmp_path / "masks"),
                               x_shape=(4, 4, 3)))
    # x_shape reshapes x only; the masks then cover the same 4x4 plane, so they are spatial.
    assert index.spec == SampleSpec("<f4", (4, 4, 3), "|u1", (4, 4), True)
    for (x, y), ex, ey in zip(read_all(index), np.concatenate(images), np.concatenate(masks)):
        np.testing.assert_array_equal(x, ex.reshape(4, 4, 3))
        np.testing.assert_array_equal(y, ey)


def test_paired_row_counts_must_agree(tmp_path: Path) -> None:
    save(tmp_path / "x/one.npy", np.zeros((5, 2)))
    save(tmp_path / "y/one.npy", np.zeros((4, 2)))
    with pytest.raises(DatasetError, match=r"x/one\.npy has 5 rows but its target .*y/one\.npy has 4"):
        build_index(config(tmp_path / "x", layout="paired", targets=str(tmp_path / "y")))


def test_paired_file_counts_must_agree(tmp_path: Path) -> None:
    for name in ("x/1.npy", "x/2.npy", "y/a.npy"):
        save(tmp_path / name, np.zeros((1, 2)))
    with pytest.raises(DatasetError, match="2 input files but 1 --targets files"):
        build_index(config(tmp_path / "x", layout="paired", targets=str(tmp_path / "y")))


def test_targets_glob_matching_nothing(tmp_path: Path) -> None:
    save(tmp_path / "x/1.npy", np.zeros((1, 2)))
    with pytest.raises(DatasetError, match=r"--targets .*missing.*quote"):
        build_index(config(tmp_path / "x", layout="paired", targets=str(tmp_path / "missing/*.npy")))


# --- per-sample -----------------------------------------------------------------------------


def test_per_sample_whole_files(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = [save(tmp_path / f"s/{i:02d}.npy", rng.integers(0, 255, (5, 5), dtype=np.uint8))
              for i in range(4)]
    index = build_index(config(tmp_path / "s", layout="per-sample"))
    assert index.spec == SampleSpec("|u1", (5, 5), None, None, False)
    with SampleReader(index) as reader:
        for i, expected in enumerate(arrays):
            x, y = reader.read(i)
            np.testing.assert_array_equal(x, expected)
            assert y is None
            assert reader.locate(i) == (str(tmp_path / f"s/{i:02d}.npy"), 0)


def test_per_sample_labels(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"s/{i}.npy", np.full((2, 2), i, np.float32))
    labels = save(tmp_path / "labels.npy", np.array([7, 8, 9], np.int64))
    labels_path = str(tmp_path / "labels.npy")
    index = build_index(config(tmp_path / "s", layout="per-sample", labels=labels_path))
    assert index.spec == SampleSpec("<f4", (2, 2), "<i8", (), False)
    for i, (x, y) in enumerate(read_all(index)):
        assert (x == i).all() and y is not None and y == labels[i] and y.shape == ()


def test_per_sample_labels_length_mismatch(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"s/{i}.npy", np.zeros(2))
    save(tmp_path / "labels.npy", np.arange(4))
    with pytest.raises(DatasetError, match=r"labels\.npy has 4 entries but there are 3 sample files"):
        build_index(config(tmp_path / "s", layout="per-sample", labels=str(tmp_path / "labels.npy")))


def test_per_sample_targets(tmp_path: Path, rng: np.random.Generator) -> None:
    xs = [save(tmp_path / f"x/{i}.npy", rng.random((3, 3))) for i in range(3)]
    ys = [save(tmp_path / f"y/{i}.npy", rng.random((3, 3)) > 0.5) for i in range(3)]
    index = build_index(config(tmp_path / "x", layout="per-sample", targets=str(tmp_path / "y/*.npy")))
    assert index.spec == SampleSpec("<f8", (3, 3), "|b1", (3, 3), True)
    for (x, y), ex, ey in zip(read_all(index), xs, ys):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_per_sample_shapes_must_agree(tmp_path: Path) -> None:
    save(tmp_path / "s/a.npy", np.zeros((4, 4)))
    save(tmp_path / "s/b.npy", np.zeros((4, 5)))
    message = r"b\.npy has samples of shape \(4, 5\) but .*a\.npy has \(4, 4\)"
    with pytest.raises(DatasetError, match=message):
        build_index(config(tmp_path / "s", layout="per-sample"))


def test_per_sample_target_shapes_must_agree(tmp_path: Path) -> None:
    for i in range(2):
        save(tmp_path / f"x/{i}.npy", np.zeros((4, 4)))
    save(tmp_path / "y/0.npy", np.zeros((4, 4)))
    save(tmp_path / "y/1.npy", np.zeros((3, 4)))
    with pytest.raises(DatasetError, match=r"y/1\.npy has samples of shape"):
        build_index(config(tmp_path / "x", layout="per-sample", targets=str(tmp_path / "y")))


# --- npz ------------------------------------------------------------------------------------


def test_npz_stored_members_are_mapped_in_place(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.random((6, 4)).astype(np.float32)
    y = rng.integers(0, 9, (6, 2, 2)).astype(np.int16)
    path = tmp_path / "pairs.npz"
    np.savez(path, x=x, y=y)
    index = build_index(config(path, layout="paired", x_key="x", y_key="y"))
    src = index.x_sources[0]
    assert not src.compressed and src.member == "x"
    with open(path, "rb") as f:  # the offset really is where the data starts inside the zip
        f.seek(src.offset)
        assert f.read(x.nbytes) == x.tobytes()
    assert index.spec == SampleSpec("<f4", (4,), "<i2", (2, 2), False)  # y is not x's plane
    for i, (rx, ry) in enumerate(read_all(index)):
        np.testing.assert_array_equal(rx, x[i])
        np.testing.assert_array_equal(ry, y[i])


def test_npz_compressed_members_are_loaded_with_one_warning(
        tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    x = rng.random((5, 3))
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, only=x)
    index = build_index(config(path))
    assert index.x_sources[0].compressed and index.x_sources[0].member == "only"
    with caplog.at_level(logging.WARNING, logger="loader_server.data.index"):
        samples = read_all(index)
    for i, (rx, _) in enumerate(samples):
        np.testing.assert_array_equal(rx, x[i])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "packed.npz" in warnings[0].getMessage()
    assert "np.savez" in warnings[0].getMessage()


def test_per_sample_npz_with_both_members(tmp_path: Path, rng: np.random.Generator) -> None:
    pairs = [(rng.random((4, 4, 2)), rng.integers(0, 3, (4, 4))) for _ in range(3)]
    for i, (image, mask) in enumerate(pairs):
        np.savez(tmp_path / f"{i}.npz", image=image, mask=mask)
    index = build_index(config(tmp_path, layout="per-sample", x_key="image", y_key="mask"))
    assert index.spec.spatial_targets and index.spec.y_shape == (4, 4)
    for (x, y), (image, mask) in zip(read_all(index), pairs):
        np.testing.assert_array_equal(x, image)
        np.testing.assert_array_equal(y, mask)


def test_npz_with_several_members_needs_x_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 2)), masks=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match=r"two\.npz has members images, masks.*--x-key"):
        build_index(config(tmp_path / "two.npz"))


def test_npz_missing_member(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 2)), masks=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match=r"two\.npz has no member 'labels'"):
        build_index(config(tmp_path / "two.npz", x_key="labels"))


def test_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DatasetError, match=r"broken\.npz is not a valid \.npz archive"):
        build_index(config(tmp_path / "broken.npz"))


def test_npz_object_member_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object))
    with pytest.raises(DatasetError, match=r"obj\.npz \(member 'x'\) has dtype object"):
        build_index(config(tmp_path / "obj.npz"))


def test_y_key_needs_npz_inputs(tmp_path: Path) -> None:
    save(tmp_path / "plain.npy", np.zeros((2, 2)))
    with pytest.raises(DatasetError, match=r"plain\.npy is a \.npy file.*--targets"):
        build_index(config(tmp_path / "plain.npy", layout="paired", y_key="y"))


def test_read_source_header_only(tmp_path: Path) -> None:
    array = save(tmp_path / "a.npy", np.zeros((3, 2), np.uint16))
    src = read_source(str(tmp_path / "a.npy"))
    assert (src.dtype, src.shape, src.member, src.compressed) == ("<u2", (3, 2), None, False)
    assert src.offset + array.nbytes == os.path.getsize(tmp_path / "a.npy")
    with pytest.raises(DatasetError, match=r"a\.npy is a \.npy file"):
        read_source(str(tmp_path / "a.npy"), "x")
    with pytest.raises(DatasetError, match=r"cannot read .*gone\.npy"):
        read_source(str(tmp_path / "gone.npy"))


# --- reading at run time --------------------------------------------------------------------


def test_file_truncated_after_start(tmp_path: Path) -> None:
    path = tmp_path / "data.npy"
    save(path, np.arange(4000, dtype=np.float64).reshape(1000, 4))
    index = build_index(config(path))
    with SampleReader(index) as reader:
        reader.read(999)  # the file is now mapped
        with open(path, "r+b") as f:
            f.truncate(200)
        with pytest.raises(DatasetError, match=r"sample 999 \(.*data\.npy row 999\)") as caught:
            reader.read(999)
    assert isinstance(caught.value.__cause__, OSError)


def test_file_removed_after_start(tmp_path: Path) -> None:
    save(tmp_path / "a.npy", np.zeros((2, 2)))
    save(tmp_path / "b.npy", np.zeros((3, 2)))
    index = build_index(config(tmp_path))
    os.remove(tmp_path / "b.npy")
    with SampleReader(index) as reader:
        assert reader.locate(3) == (str(tmp_path / "b.npy"), 1)
        with pytest.raises(DatasetError, match=r"sample 3 \(.*b\.npy row 1\)") as caught:
            reader.read(3)
        with pytest.raises(IndexError):
            reader.read(5)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_reader_keeps_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    for i in range(300):
        save(tmp_path / f"s/{i:03d}.npy", np.full(3, i, np.int32))
    index = build_index(config(tmp_path / "s", layout="per-sample"))
    before = len(os.listdir("/proc/self/fd"))
    reader = SampleReader(index)
    most = before
    for i in range(index.num_samples):
        x, _ = reader.read(i)
        assert (x == i).all()
        most = max(most, len(os.listdir("/proc/self/fd")))
    assert most <= before + DEFAULT_MAX_OPEN + 2
    reader.close()
    assert len(os.listdir("/proc/self/fd")) <= before + 2


# --- identity -------------------------------------------------------------------------------


def make_tree(root: Path) -> DatasetIndex:
    save(root / "x/a.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    save(root / "x/b.npy", np.arange(8, dtype=np.float32).reshape(2, 4))
    save(root / "y/a.npy", np.zeros((3, 2)))
    save(root / "y/b.npy", np.ones((2, 2)))
    return build_index(config(root / "x", layout="paired", targets=str(root / "y")))


def test_fingerprint_ignores_where_the_tree_lives(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one")
    two = make_tree(tmp_path / "elsewhere/two")
    assert one.fingerprint() == two.fingerprint()


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    before = make_tree(tmp_path).fingerprint()
    assert make_tree(tmp_path).fingerprint() == before  # rewriting the same arrays: same data
    save(tmp_path / "x/b.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    save(tmp_path / "y/b.npy", np.ones((3, 2)))
    index = build_index(config(tmp_path / "x", layout="paired", targets=str(tmp_path / "y")))
    assert index.fingerprint() != before


def test_index_pickles(tmp_path: Path) -> None:
    index = make_tree(tmp_path)
    copy = pickle.loads(pickle.dumps(index))
    assert copy == index
    assert copy.fingerprint() == index.fingerprint()
    np.testing.assert_array_equal(read_all(copy)[4][0], np.arange(4, 8, dtype=np.float32))


@pytest.mark.parametrize("layout", ["combined", "per-sample"])
def test_a_whole_batch_read_at_once_is_the_samples_read_one_by_one(tmp_path: Path, rng: np.random.Generator,
                                                                     layout: str) -> None:
    """The workers' fast path for unaugmented batches (one searchsorted for the batch) must give
    the very bytes of reading each sample on its own, in the batch's order."""
    if layout == "combined":
        for i, rows in enumerate([5, 9, 3]):
            save(tmp_path / f"p{i}.npy", rng.random((rows, 7)).astype(np.float32))
        index = build_index(config(tmp_path, label_column=-1, x_shape=(2, 3)))
    else:
        for i in range(12):
            save(tmp_path / f"s{i:02d}.npy", rng.random((2, 3)).astype(np.float32))
        np.save(tmp_path.parent / "labels.npy", np.arange(12) % 4)
        index = build_index(config(tmp_path, layout="per-sample", labels=str(tmp_path.parent / "labels.npy")))
    ids = rng.permutation(index.num_samples)[:8]
    with SampleReader(index) as reader:
        x, y = reader.read(0)
        at_once = [np.zeros((8, *x.shape), x.dtype), np.zeros((8, *np.shape(y)), np.asarray(y).dtype)]
        reader.read_batch_into(ids, at_once)
        for j, sample in enumerate(ids.tolist()):
            one_x, one_y = reader.read(sample)
            assert np.array_equal(at_once[0][j], one_x) and np.array_equal(at_once[1][j], one_y)
        with pytest.raises(IndexError, match=f"sample {index.num_samples} is out of range"):
            reader.read_batch_into(np.array([0, index.num_samples]), at_once)
