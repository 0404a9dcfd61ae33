"""Tests for loader_server.tools.demo_data: the digits demo writes real files that npyloader can serve."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from loader_server.config import load_toml
from loader_server.data.index import build_index
from loader_server.data.reader import SampleReader
from loader_server.tools.demo_data import write_demo_data

DIGITS = 1797
TRAIN = int(DIGITS * 0.8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, files_per_split=3)


def test_writes_parts_and_summary(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    assert summary["samples"] == {"train": TRAIN, "val": DIGITS - TRAIN}
    assert summary["config"] == str(out / "loader.toml")
    for split in ("train", "val"):
        names = sorted(p.name for p in (out / split).glob("*.npy"))
        assert names == ["part-000.npy", "part-001.npy", "part-002.npy"]
        assert summary["files"][split] == [str(out / split / n) for n in names]
        rows = np.concatenate([np.load(p) for p in summary["files"][split]])
        assert rows.dtype == np.float32 and rows.shape == (summary["samples"][split], 65)
        assert 0.0 <= rows[:, :64].min() and rows[:, :64].max() <= 1.0


def test_config_parses_and_train_indexes(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    datasets = load_toml(out / "loader.toml")["datasets"]
    train, val = datasets["train"], datasets["val"]
    assert train.augment == ("rotate:degrees=10,p=0.5", "shift:pixels=1,p=0.5")
    assert train.shuffle and not val.shuffle and val.augment == ()
    assert (train.batch_size, train.seed, train.label_column) == (32, 0, -1)
    index = build_index(train)
    assert index.num_samples == TRAIN
    assert index.spec.x_shape == (8, 8, 1) and index.spec.y_shape == ()
    with SampleReader(index) as reader:
        labels = {int(reader.read(i)[1]) for i in range(index.num_samples)}  # type: ignore[arg-type]
    assert labels == set(range(10))
    assert build_index(val).num_samples == DIGITS - TRAIN


def test_same_seed_same_files_and_stale_parts_removed(tmp_path: Path, demo: tuple[Path, dict]) -> None:
    out, summary = demo
    write_demo_data(tmp_path, files_per_split=5, seed=0)
    second = write_demo_data(tmp_path, files_per_split=3, seed=0)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "part-000.npy", "part-001.npy", "part-002.npy"]
    for mine, theirs in zip(second["files"]["train"], summary["files"]["train"]):
        np.testing.assert_array_equal(np.load(mine), np.load(theirs))


def test_logs_one_line_per_split(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.INFO, logger="loader_server.tools.demo_data"):
        write_demo_data(tmp_path, files_per_split=1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("train" in m and str(TRAIN) in m for m in messages)
    assert any("val" in m and str(DIGITS - TRAIN) in m for m in messages)
    assert capsys.readouterr().out == ""


def test_without_scikit_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(RuntimeError, match=r"pip install 'npyloader\[demo\]'"):
        write_demo_data(tmp_path)


def test_rejects_zero_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="files_per_split"):
        write_demo_data(tmp_path, files_per_split=0)
