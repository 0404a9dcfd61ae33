"""The two programs a newcomer runs besides the server: `npyloader bench` and the demo."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.helpers import run_bounded, serve_command


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
    assert all(r["samples_per_s"] > 0 and r["mb_per_s"] > 0 for r in report["results"])
    assert set(report["ceilings"]) == {"raw pyzmq tcp", "raw pyzmq ipc", "memcpy"}
    assert len(report["first_batch"]) == 2 and len(report["server_rss_by_size"]) == 2
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "### Targets" in out.read_text()


@pytest.mark.slow
def test_demo_trains_the_digits_model_well_above_chance(tmp_path):
    result = run_bounded([sys.executable, "-m", "loader_server.tools.demo", "--dir", str(tmp_path / "demo"),
                          "--epochs", "4"], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", result.stderr).group(1))
    assert accuracy > 0.8
    assert "training waited" in result.stderr
