"""The two programs a newcomer runs besides the server: `npyloader bench` and the demo."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from tests.helpers import TF_STARTUP_NOISE, run_bounded, serve_command


@pytest.mark.slow
def test_bench_quick_writes_the_report_json_and_plot_for_every_loader(tmp_path):
    out = tmp_path / "BENCH.md"
    result = run_bounded(serve_command("bench", "--quick", "--repeats", "1", "--out", str(out)), timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    loaders = {(r["workload"], r["loader"].split(",")[0]) for r in report["results"]}
    for workload in ("io", "aug"):
        assert {(workload, "tutorial generator (in-process)"), (workload, "npyloader tcp"),
                (workload, "npyloader ipc"), (workload, "keras PyDataset"), (workload, "tf.data numpy_function")} <= loaders
    assert ("aug", "npyloader tcp") in loaders and any("remote" in r["loader"] for r in report["results"])
    assert {r["workload"] for r in report["results"] if r["loader"].endswith(", through fit")} == {"io", "aug"}
    for workload in ("io", "aug"):
        for key, name in (("torch-batch", "torch DataLoader, a batch per item"), ("grain", "grain MapDataset")):
            measured = any(r["workload"] == workload and r["loader"].startswith(name) for r in report["results"])
            assert measured or f"{workload}: {key}" in report["skipped"]
    assert all(r["samples_per_s"] > 0 and r["mb_per_s"] > 0 for r in report["results"])
    assert set(report["ceilings"]) == {"raw pyzmq tcp", "raw pyzmq ipc", "memcpy"}
    assert len(report["first_batch"]) == 2 and len(report["server_rss_by_size"]) == 2
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "### Targets" in out.read_text()


@pytest.mark.slow
def test_bench_startup_times_every_case_to_the_first_batch(tmp_path):
    data = tmp_path / "small"
    result = run_bounded(serve_command("bench", "--startup", "--files", "300", "--repeats", "1",
                                       "--startup-data", str(data)), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| (cold \(--no-index-cache\)|cold, writing the index cache|from the index cache) "
                      r"\| ([\d.]+) \| ([\d.]+) \| server [\d.]+.*worker [\d.]+", result.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["cold (--no-index-cache)", "cold, writing the index cache", "from the index cache"]
    assert all(0 < float(ready) <= float(first) for _, ready, first in rows)
    assert len(list(data.iterdir())) == 300  # kept for the next run


@pytest.mark.slow
def test_demo_trains_the_digits_model_well_above_chance(tmp_path):
    # the demo quiets TensorFlow unless the user chose its log level: this test leaves it to the demo
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = run_bounded([sys.executable, "-m", "loader_server.tools.demo", "--dir", str(tmp_path / "demo"),
                          "--epochs", "4"], timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", result.stderr).group(1))
    assert accuracy > 0.8
    assert "training waited" in result.stderr
    assert not [phrase for phrase in TF_STARTUP_NOISE if phrase in result.stdout + result.stderr], result.stderr
