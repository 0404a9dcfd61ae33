"""Issue 7's soak, short: a minute of random faults of every kind loses and repeats nothing,
and everything the soak started is gone when it ends. Loss and repeats are counted here, from
the sample ids the soak's clients recorded, not taken from the soak's own verdict."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from loader_server.tools.netlab.link import link_faults_unavailable_reason
from loader_server.tools.soak.data import DATASETS
from loader_server.tools.soak.faults import FAULTS
from loader_server.tools.soak.report import KEPT_BELOW
from tests.helpers import run_bounded, serve_command


def processes_with_tmpdir(folder: Path) -> list[str]:
    """Live processes whose TMPDIR lies in `folder`: the soak gives each child such a TMPDIR,
    so this finds what it started without trusting its own bookkeeping."""
    marker = f"TMPDIR={folder}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if any(var.startswith(marker) for var in environ.split(b"\0")):
            found.append(entry + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def recorded_epochs(results: Path, name: str) -> tuple[list[list[int]], list[dict]]:
    """Client `name`'s own record (results/NAME.jsonl, one JSON object per line, written as it
    read): the sample ids of each epoch it completed, and every other record."""
    epochs, other = [], []
    for line in (results / f"{name}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "ids" in record:
            epochs.append(record["ids"])
        else:
            other.append(record)
    return epochs, other


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_one_minute_soak_loses_and_repeats_nothing_and_leaves_nothing(tmp_path_factory):
    # A short folder: the server's ipc socket lives under TMPDIR, and a unix socket path has at
    # most 107 bytes.
    scratch = tmp_path_factory.mktemp("s")
    out = tmp_path_factory.mktemp("out") / "reliability.md"
    logs = tmp_path_factory.mktemp("logs")
    done = run_bounded(serve_command("soak", "--minutes", "1", "--seed", "1", "--out", str(out), "--logs", str(logs)),
                       timeout=600, env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["ok"] and report["all_problems"] == []
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["client_errors"] == 0
    # the network faults need the netlab (root, iproute2, iptables); without it the report says why
    lab_missing = link_faults_unavailable_reason()
    assert report["faults_by_kind"].keys() == {f.kind for f in FAULTS if not f.needs_link or lab_missing is None}
    if lab_missing is None:
        assert report["network"].startswith("Network faults ran"), report["network"]
    else:
        assert lab_missing in report["network"] and "left out" in done.stderr, report["network"]
    assert all(count >= 1 for count in report["faults_by_kind"].values()), report["faults_by_kind"]
    assert all(f["ok"] and f["recovery_s"] is not None for f in report["faults"])
    readers = sorted(p.stem for p in (logs / "results").glob("*.jsonl") if not p.stem.startswith("vanishing"))
    assert sorted(c["name"] for c in report["clients"]) == readers and len(readers) >= 2, readers
    assert {c["dataset"] for c in report["clients"]} == set(DATASETS), "both datasets were read and checked"
    for client in report["clients"]:
        assert client["epochs"] >= 1 and client["batches"] > 0, client
        assert client["rows_checked"] > 0 and client["corrupt_rows"] == 0, client
        # every epoch the client completed holds each sample id of its dataset exactly once,
        # counted here; the soak's tally of the same records must agree
        epochs, other = recorded_epochs(logs / "results", client["name"])
        samples = DATASETS[client["dataset"]].samples
        for number, ids in enumerate(epochs):
            counts = Counter(ids)
            lost = sorted(set(range(samples)) - counts.keys())
            repeated = sorted(i for i, c in counts.items() if c > 1)
            strays = sorted(counts.keys() - set(range(samples)))
            assert (lost, repeated, strays) == ([], [], []), (
                f"client {client['name']}, its epoch #{number}: lost {lost[:10]}, repeated {repeated[:10]}, "
                f"out of range {strays[:10]}")
        assert len(epochs) == client["epochs"], (len(epochs), client)
        assert not [r for r in other if "error" in r], other
        assert any(r.get("end") for r in other), f"client {client['name']} did not record its end: {other}"
    assert {m["role"] for m in report["memory"]} >= {"server", "local worker 1", "remote worker process"}
    assert report["leftover_processes"] == [] and report["shm_left"] == []
    assert processes_with_tmpdir(scratch) == []
    assert list(scratch.iterdir()) == [], "the soak removes its temporary folder"
    # the file is the printed report, then the marker below which hand-written sections are kept
    assert "## Verdict: PASS" in done.stdout
    assert out.read_text() == done.stdout.rstrip("\n") + "\n\n" + KEPT_BELOW + "\n"
