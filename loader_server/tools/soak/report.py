"""What a soak found, as data (JSON) and as the Markdown of docs/RELIABILITY.md."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loader_server.tools.soak.faults import FAULTS


@dataclass
class FaultRecord:
    """One injected fault: when, what exactly, and how long until the system was whole again."""

    kind: str
    at_s: float
    detail: str = ""
    recovery_s: float | None = None
    ok: bool = True


@dataclass
class SoakReport:
    command: str
    machine: str
    cores: int
    seed: int
    setup: dict[str, Any]
    minutes_requested: float
    network: str = ""
    kinds: list[str] = field(default_factory=lambda: [f.kind for f in FAULTS])
    minutes_run: float = 0.0
    load_average: list[float] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)
    shm_left: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.clients)

    @property
    def faults_by_kind(self) -> dict[str, int]:
        """Injections of each kind in the rotation (network faults are left out where they cannot run)."""
        counts = Counter(f.kind for f in self.faults)
        return {kind: counts[kind] for kind in self.kinds}

    @property
    def ok(self) -> bool:
        return not self.all_problems()

    def all_problems(self) -> list[str]:
        """Every reason this soak failed; empty when it passed."""
        found = list(self.problems)
        for c in self.clients:
            for key in ("lost", "duplicated", "unexpected", "corrupt_rows"):
                if c[key]:
                    found.append(f"client {c['name']}: {c[key]} {key.replace('_', ' ')} ({'; '.join(c['bad_epochs'])})")
            found += [f"client {c['name']}: {e}" for e in c["errors"]]
        found += [f"fault {f.kind} at {f.at_s:.0f}s: {f.detail}" for f in self.faults if not f.ok]
        found += [f"left running: {p}" for p in self.leftover_processes]
        found += [f"shared memory left: /dev/shm/{s}" for s in self.shm_left]
        return found

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "faults_by_kind": self.faults_by_kind, "ok": self.ok,
                           "batches": self.total("batches"), "lost": self.total("lost"),
                           "duplicated": self.total("duplicated"),
                           "client_errors": sum(len(c["errors"]) for c in self.clients),
                           "all_problems": self.all_problems()}, indent=2)

    def write(self, out: Path) -> None:
        """The report, then whatever an existing `out` keeps after KEPT_BELOW: sections written by
        hand (fault tests measured apart from the soak) survive the next soak run."""
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.read_text() if out.exists() else ""
        kept = old[old.index(KEPT_BELOW):] if KEPT_BELOW in old else KEPT_BELOW + "\n"
        out.write_text(markdown(self).rstrip("\n") + "\n\n" + kept)
        out.with_suffix(".json").write_text(self.to_json() + "\n")


# A line in the soak's Markdown after which the file is not the soak's: kept when it is rewritten.
KEPT_BELOW = "<!-- Below: not written by npyloader soak; kept when it rewrites this file. -->"


def _recovery(records: list[FaultRecord]) -> tuple[str, str]:
    times = [r.recovery_s for r in records if r.recovery_s is not None]
    if not times:
        return "", ""
    return f"{float(np.median(times)):.1f}", f"{max(times):.1f}"


def _intro(r: SoakReport) -> list[str]:
    s = r.setup
    return [
        f"`{r.command}` ran for {r.minutes_run:.1f} minutes on {r.machine}, {r.cores} cores (load average "
        f"{r.load_average[0]:.1f} at the start and {r.load_average[1]:.1f} at the end, counting whatever else the "
        "machine was running). This file and its JSON are written by that command.",
        "",
        f"It starts real processes: `npyloader serve` with {s['workers']} local workers (heartbeat "
        f"{s['heartbeat_s']:g} s, client timeout {s['client_timeout_s']:g} s) on fixed ports, one "
        "`npyloader worker --processes 1` joined over tcp, and two client processes. Client A reads "
        f"`train` ({s['train']}) epoch after epoch in index order with `BatchStream`; client B reads `val` "
        f"({s['val']}) asking for batches in a fresh random order each epoch with a prefetch window of "
        f"{s['prefetch']}, as Keras `fit(shuffle=True)` does. Each client sleeps {s['step_ms']:g} ms per batch, "
        f"as a training step would, and waits up to {s['client_wait_s']:g} s for a batch. `train` also runs the "
        f"soak's own augment op, which does nothing until the hung_op fault makes it hang one worker process; "
        f"server and remote worker run with `--task-timeout {s['task_timeout_s']:g}`. Faults of "
        f"{len(r.kinds)} kinds are injected one at a time, in a seeded shuffled cycle with random pauses "
        "between them, until the time is up and every kind has been injected at least once.",
        "",
        r.network,
        "",
        "How to read it. **Lost** counts, over every completed epoch of both clients, sample ids that never "
        "arrived; **duplicated** counts ids that arrived more than once; each should be 0, and anything else is "
        "a bug. Every `val` row is compared pixel by pixel with its sample, and two rows of each augmented "
        "`train` batch are recomputed with the server's pipeline and seed (**corrupt rows**). **Recovered in** "
        "is the time from injecting a fault until every worker is registered again and both clients receive "
        "batches again. **Batch wait** is how long a client's `next()` / `get()` call blocked: what a training "
        "step would wait for data, not how long a batch takes to build (prefetch hides that). **Peak RSS** is "
        "the kernel's high-water mark (VmHWM) of each role's processes, sampled every 0.5 s; a role whose "
        "process was replaced after a fault shows the largest of them, and resident pages include shared ones "
        "(the server's shared-memory slots, memory-mapped files).",
    ]


def markdown(r: SoakReport) -> str:
    verdict = "PASS" if r.ok else "FAIL"
    by_kind = r.faults_by_kind
    lines = ["# Reliability", "", *_intro(r), "", f"## Verdict: {verdict}", ""]
    lines += [f"- {p}" for p in r.all_problems()] + ([""] if not r.ok else [])
    checked = r.total("rows_checked")
    lines += ["| | |", "|---|---:|",
              f"| minutes run | {r.minutes_run:.1f} |",
              f"| faults injected | {len(r.faults)} |",
              f"| batches delivered | {r.total('batches'):,} |",
              f"| samples delivered | {r.total('samples'):,} |",
              f"| lost | {r.total('lost')} |",
              f"| duplicated | {r.total('duplicated')} |",
              f"| ids out of range | {r.total('unexpected')} |",
              f"| rows checked pixel by pixel / corrupt | {checked:,} / {r.total('corrupt_rows')} |",
              f"| client errors | {sum(len(c['errors']) for c in r.clients)} |",
              f"| faults not recovered from | {sum(not f.ok for f in r.faults)} |",
              f"| processes left running | {len(r.leftover_processes)} |",
              f"| shared-memory segments left | {len(r.shm_left)} |", ""]
    lines += ["## Faults by kind", "", "| kind | what it does | injected | recovered in, median s | max s |",
              "|---|---|---:|---:|---:|"]
    for fault in FAULTS:
        median, worst = _recovery([f for f in r.faults if f.kind == fault.kind])
        injected = by_kind.get(fault.kind, "not run (no link to fault)")
        lines.append(f"| {fault.kind} | {fault.summary} | {injected} | {median} | {worst} |")
    lines += ["", "## Clients", "", "| client | reads | epochs | batches | lost | duplicated | errors | reconnects "
              "| batch wait p50 ms | p99 ms | max ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r.clients:
        lines.append(f"| {c['name']} | `{c['dataset']}`, {c['order']} order | {c['epochs']:,} | {c['batches']:,} | "
                     f"{c['lost']} | {c['duplicated']} | {len(c['errors'])} | {c['reconnects']} | "
                     f"{c['wait_p50_ms']:.2f} | {c['wait_p99_ms']:.1f} | {c['wait_max_ms']:,.0f} |")
    lines += ["", "## Memory", "", "| role | processes | peak RSS MB | RSS at the end MB |", "|---|---:|---:|---:|"]
    for m in r.memory:
        lines.append(f"| {m['role']} | {m['processes']} | {m['peak_rss_mb']:,.0f} | {m['end_rss_mb']:,.0f} |")
    lines += ["", "## Every fault", "", "| # | at s | kind | what happened | recovered in s |",
              "|---:|---:|---|---|---:|"]
    for i, f in enumerate(r.faults, 1):
        recovered = f"{f.recovery_s:.1f}" if f.recovery_s is not None else "**not recovered**"
        lines.append(f"| {i} | {f.at_s:.0f} | {f.kind} | {f.detail} | {recovered} |")
    return "\n".join(lines) + "\n"
