"""The soak rewrites its report but keeps the hand-written sections below its marker."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from loader_server.tools.soak.report import KEPT_BELOW, FaultRecord, SoakReport

RECORDED = Path(__file__).parents[2] / "docs" / "RELIABILITY.json"


def report(minutes: float) -> SoakReport:
    """The recorded soak's report, as its JSON holds it, run for `minutes`. A report recorded
    before the soak had the hang op and network faults lacks their fields: their defaults stand."""
    saved = json.loads(RECORDED.read_text())
    kept = {f.name: saved[f.name] for f in fields(SoakReport) if f.name in saved}
    kept["setup"].setdefault("task_timeout_s", 5.0)
    kept["faults"] = [FaultRecord(**f) for f in kept["faults"]]
    return replace(SoakReport(**kept), minutes_run=minutes)


def test_rewriting_the_report_keeps_what_is_below_the_marker(tmp_path: Path):
    out = tmp_path / "RELIABILITY.md"
    report(1.0).write(out)
    assert out.read_text().rstrip().endswith(KEPT_BELOW), "a fresh file ends with the marker"
    out.write_text(out.read_text() + "\n## Network faults\n\n| fault | result |\n")
    report(30.0).write(out)
    text = out.read_text()
    assert text.count(KEPT_BELOW) == 1 and text.endswith("## Network faults\n\n| fault | result |\n")
    assert "ran for 30.0 minutes" in text.split(KEPT_BELOW)[0], "the soak's own part is the new run's"
