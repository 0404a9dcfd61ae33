"""The two programs a newcomer runs besides the server: `npyloader bench` and the demo."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import serve_command


def test_bench_quick_measures_both_loaders_on_both_workloads(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(serve_command("bench", "--quick", "--repeats", "1", "--json", "--out", str(out)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {(r["workload"], r["loader"].split(",")[0]) for r in rows} == {
        (w, loader) for w in ("io", "aug") for loader in ("tutorial generator", "npyloader tcp")}
    assert all(r["samples_per_s"] > 0 and r["mb_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_demo_trains_the_digits_model_well_above_chance(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loader_client.demo", "--dir", str(tmp_path / "demo"),
                             "--epochs", "4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", result.stderr).group(1))
    assert accuracy > 0.8
    assert "training waited" in result.stderr
