"""Network faults between hosts, one scenario at a time: does the epoch still arrive exactly once,
byte-identical to a run without the fault, and in bounded time?

    python -m loader_server.tools.netlab.scenarios --table             # all 8 scenarios: a markdown table
    python -m loader_server.tools.netlab.scenarios --fault partition --link worker

A scenario is a fault (`delay` 100±20 ms each way, 5% `loss`, a 10 s `partition`, a 10 Mbit/s
`cap`) on one link between two hosts of `two_hosts()`:

- `worker`: the server on A (one local worker, to redo what a lost remote worker held), a
  remote `npyloader worker` on B, the trainer on A. Only the worker link crosses hosts.
- `trainer`: the server on A with local workers, the trainer on B over the socket (B shares A's
  /dev/shm, so `auto` would read shared memory and bypass the network). Only the client link
  crosses hosts.

The trainer (`trainer.py`) records a digest and the sample ids of every batch; the dataset's label
column is each sample's id, and the augmentation is seeded, so equal digests mean equal bytes.
Delay comes from the relay (`relay.py`) on B, in front of the server's port; loss, partition and
cap from `Link`, aimed at the link's port (the cap, a qdisc, takes the whole veth, which only that
link crosses). While it runs, `npyloader stats --watch --json` on A (over loopback, untouched by
the faults) records what the server saw: which remote workers it had, what each built, what it
redid. A worker-link partition waits until the remote worker has built a few batches, so that
it holds work when the link goes; a trainer-link partition until the trainer has a few batches.

Every wait has a deadline, and `two_hosts()` stops every process on the way out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loader_server.tools.local_server import READY, wait_for_line
from loader_server.tools.netlab.hosts import Host, two_hosts
from loader_server.tools.netlab.link import Link

log = logging.getLogger(__name__)

FAULTS = ("delay", "loss", "partition", "cap")
LINKS = ("worker", "trainer")
CLIENT_PORT = 5555
WORKER_PORT = 5556


class ScenarioError(RuntimeError):
    """A scenario could not be set up or did not finish in time; the message says which step."""


@dataclass(frozen=True)
class LabConfig:
    """The data, the service and the faults of every scenario."""

    samples: int = 2560
    side: int = 32                  # a sample is a side x side float32 image, plus its id
    batch_size: int = 16
    seed: int = 7
    augment: tuple[str, ...] = ("rotate:degrees=15,p=0.5", "noise:std=0.05")
    pace_ms: float = 2.0            # each sample's cost in the workers (the pause op)
    # A worker-link partition needs an epoch that outlasts the partition and the rejoin after it.
    partition_pace_ms: float = 20.0
    worker_link_local_workers: int = 1
    trainer_link_local_workers: int = 2
    remote_processes: int = 2
    client_timeout_s: float = 30.0  # BatchStream's default
    delay_ms: float = 100.0
    jitter_ms: float = 20.0
    loss: float = 0.05
    partition_s: float = 10.0
    cap_mbit: float = 10.0
    remote_batches_before_partition: int = 3
    trainer_batches_before_partition: int = 20
    watch_s: float = 0.2
    bound_s: float = 150.0          # the most one trainer may take; past it the scenario has hung
    start_s: float = 90.0           # the most a server or remote worker may take to start

    @property
    def batches(self) -> int:
        return -(-self.samples // self.batch_size)

    def pace_for(self, fault: str | None, link: str) -> float:
        return self.partition_pace_ms if link == "worker" and fault == "partition" else self.pace_ms


def write_dataset(folder: Path, cfg: LabConfig) -> Path:
    """Combined-layout files whose label column is the sample's id and whose pixels derive from it."""
    folder.mkdir(parents=True, exist_ok=True)
    features = cfg.side * cfg.side
    for i, start in enumerate(range(0, cfg.samples, 1000)):
        ids = np.arange(start, min(start + 1000, cfg.samples))
        pixels = ((ids[:, None] * 7919 + np.arange(features)[None, :] * 31) % 1009) / 1009.0
        np.save(folder / f"part-{i:03d}.npy", np.column_stack([pixels, ids]).astype(np.float32))
    return folder


class _Lines:
    """The lines a process writes to stdout, each stamped with time.monotonic() as it arrives."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)


def _until(condition: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what} within {seconds:g}s")
        time.sleep(0.05)
    return found


@dataclass
class Outcome:
    """What one run did: the trainer's result, the server's stats over time, and when the fault struck."""

    fault: str | None
    link: str
    pace_ms: float
    trainer: dict
    timeline: list[tuple[float, dict]]
    marks: dict[str, float] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.fault or 'clean'}/{self.link}"

    @property
    def digests(self) -> list[str]:
        return [b["digest"] for b in self.trainer["batches"]]

    def ids(self) -> list[int]:
        return sorted(i for b in self.trainer["batches"] for i in b["ids"])

    def exactly_once(self, cfg: LabConfig) -> bool:
        return len(self.trainer["batches"]) == cfg.batches and self.ids() == list(range(cfg.samples))

    def remote_totals(self) -> list[tuple[float, int, int]]:
        """(time, batches remote workers built so far, remote workers registered) per stats sample.
        A worker given up and rejoined is a new session counting from 0: the old one is banked."""
        banked, last, out = 0, {}, []
        for t, stats in self.timeline:
            if "workers" not in stats:
                continue
            now = {w["id"]: w["batches"] for w in stats["workers"]["list"] if not w["local"]}
            banked += sum(n for wid, n in last.items() if wid not in now or now[wid] < n)
            last = now
            out.append((t, banked + sum(now.values()), len(now)))
        return out

    def remote_built(self, until: float = float("inf")) -> int:
        return max((n for t, n, _ in self.remote_totals() if t <= until), default=0)

    def redone(self) -> int:
        final = [s for _, s in self.timeline if "workers" in s]
        return final[-1]["workers"]["requeued_batches"] if final else 0

    def _first_after(self, mark: str, test: Callable[[int, int], bool]) -> float | None:
        start = self.marks.get(mark)
        if start is None:
            return None
        return next((round(t - start, 1) for t, n, k in self.remote_totals() if t >= start and test(n, k)), None)

    def given_up_s(self) -> float | None:
        """Seconds from the partition until the server had no remote worker left."""
        return self._first_after("fault_on", lambda n, k: k == 0)

    def rejoined_s(self) -> float | None:
        """Seconds from the heal until a remote worker was registered again, after being given up."""
        if self.given_up_s() is None:
            return None
        return self._first_after("healed", lambda n, k: k > 0)

    def building_again_s(self) -> float | None:
        """Seconds from the heal until a remote worker delivered a batch again."""
        at_heal = self.remote_built(self.marks.get("healed", 0.0))
        return self._first_after("healed", lambda n, k: n > at_heal)

    def problems(self, cfg: LabConfig, reference: Outcome) -> list[str]:
        """Everything that broke the promise: an error, a lost, repeated or changed batch."""
        found = []
        if self.trainer.get("error"):
            found.append(f"the client raised {self.trainer['error']}")
        if not self.exactly_once(cfg):
            got = self.ids()
            found.append(f"not exactly once: {len(self.trainer['batches'])} of {cfg.batches} batches, "
                         f"{len(got)} sample ids ({len(set(got))} distinct) of {cfg.samples}")
        changed = [i for i, (x, y) in enumerate(zip(self.digests, reference.digests)) if x != y]
        if changed:
            found.append(f"{len(changed)} batch(es) differ from the clean run, first batch {changed[0]}")
        return found


def _serve_argv(cfg: LabConfig, data: Path, a: Host, local_workers: int, pace_ms: float, remote: bool) -> list[str]:
    argv = [sys.executable, "-m", "loader_server.cli", "serve", "--data", str(data), "--label-column", "-1",
            "--x-shape", f"{cfg.side},{cfg.side}", "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed),
            "--workers", str(local_workers), "--bind", f"tcp://{a.address}:{CLIENT_PORT}"]
    for spec in (*cfg.augment, f"loader_server.tools.netlab.ops:pause:ms={pace_ms:g}"):
        argv += ["--augment", spec]
    if remote:
        argv += ["--worker-bind", f"tcp://{a.address}:{WORKER_PORT}"]
    return argv


def _relay(host: Host, to: str, port: int, cfg: LabConfig) -> str:
    """A delaying relay on `host` in front of `to`:`port`; the tcp:// address to use instead."""
    proc = host.popen([sys.executable, "-m", "loader_server.tools.netlab.relay", "--listen", "127.0.0.1:0",
                       "--to", f"{to}:{port}", "--delay-ms", f"{cfg.delay_ms:g}", "--jitter-ms", f"{cfg.jitter_ms:g}",
                       "--seed", str(cfg.seed)], stdout=subprocess.PIPE, text=True)
    lines = _Lines(proc)
    _until(lambda: lines.snapshot() or proc.poll() is not None, cfg.start_s, "the relay did not start")
    if not lines.snapshot():
        raise ScenarioError(f"the relay exited with {proc.returncode}")
    return "tcp://" + lines.snapshot()[0][1].split()[1]


def run(fault: str | None, link: str, cfg: LabConfig, data: Path, workdir: Path,
        pace_ms: float | None = None) -> Outcome:
    """One scenario (or, with `fault` None, the clean run it is compared with) on two fresh hosts."""
    if fault not in (None, *FAULTS) or link not in LINKS:
        raise ValueError(f"no scenario {fault}/{link}: faults are {FAULTS}, links {LINKS}")
    pace = cfg.pace_for(fault, link) if pace_ms is None else pace_ms
    name = f"{fault or 'clean'}-{link}"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
    logs = {role: workdir / f"{name}-{role}.log" for role in ("server", "worker")}
    marks: dict[str, float] = {}
    with two_hosts() as (a, b), Link(a, b) as net:
        url = f"tcp://{a.address}:{CLIENT_PORT}"
        local = cfg.worker_link_local_workers if link == "worker" else cfg.trainer_link_local_workers
        with open(logs["server"], "w") as out:
            server = a.popen(_serve_argv(cfg, data, a, local, pace, remote=link == "worker"), env=env,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_line(server, logs["server"], READY, cfg.start_s, what=f"{name}: the server")
        watch = a.popen([sys.executable, "-m", "loader_server.cli", "stats", url, "--watch", "--json",
                         "--interval", f"{cfg.watch_s:g}"], env=env, stdout=subprocess.PIPE, text=True)
        stats = _Lines(watch)

        def timeline() -> list[tuple[float, dict]]:
            return [(t, json.loads(line)) for t, line in stats.snapshot()]

        if link == "worker":
            connect = (_relay(b, a.address, WORKER_PORT, cfg) if fault == "delay"
                       else f"tcp://{a.address}:{WORKER_PORT}")
            with open(logs["worker"], "w") as out:
                b.popen([sys.executable, "-m", "loader_server.cli", "worker", "--connect", connect,
                         "--processes", str(cfg.remote_processes)], env=env, stdout=out, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL)
            _until(lambda: any(sum(not w["local"] for w in s["workers"]["list"]) == cfg.remote_processes
                               for _, s in timeline() if "workers" in s), cfg.start_s,
                   "the remote worker did not join")
        trainer_host, trainer_url, transport = (a, url, "auto") if link == "worker" else (b, url, "socket")
        if link == "trainer" and fault == "delay":
            trainer_url = _relay(b, a.address, CLIENT_PORT, cfg)
        port = WORKER_PORT if link == "worker" else CLIENT_PORT
        if fault == "loss":
            net.loss(cfg.loss, port=port)
        elif fault == "cap":
            net.cap(cfg.cap_mbit)
        marks["trainer_start"] = time.monotonic()
        trainer = trainer_host.popen(
            [sys.executable, "-m", "loader_server.tools.netlab.trainer", trainer_url, "--timeout",
             f"{cfg.client_timeout_s:g}", "--transport", transport], env=env, stdout=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
        progress = _Lines(trainer)
        if fault == "partition":
            _partition(net, port, link, cfg, marks, progress, timeline, trainer)
        try:
            trainer.wait(max(1.0, cfg.bound_s - (time.monotonic() - marks["trainer_start"])))
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"{name}: the trainer did not finish within {cfg.bound_s:g}s (a hang)") from None
        marks["trainer_end"] = time.monotonic()
        _until(lambda: any(t > marks["trainer_end"] for t, _ in stats.snapshot()), 10 + cfg.watch_s,
               "no stats from the server after the epoch")
        _until(lambda: any(line.startswith("result ") for _, line in progress.snapshot()), 10,
               f"the trainer exited with {trainer.returncode} without its result")
        result = next(json.loads(line.removeprefix("result ")) for _, line in progress.snapshot()
                      if line.startswith("result "))
        outcome = Outcome(fault, link, pace, result, timeline(), marks)
    outcome.logs = {role: p.read_text(errors="replace") for role, p in logs.items() if p.exists()}
    return outcome


def _partition(net: Link, port: int, link: str, cfg: LabConfig, marks: dict[str, float], progress: _Lines,
               timeline: Callable[[], list[tuple[float, dict]]], trainer: subprocess.Popen) -> None:
    """Cut the link once it carries work, hold the cut for `partition_s` (the fault itself), heal it."""
    if link == "worker":
        probe = Outcome(None, link, 0.0, {"batches": []}, [])

        def ready() -> bool:
            probe.timeline = timeline()
            return probe.remote_built() >= cfg.remote_batches_before_partition or trainer.poll() is not None
        _until(ready, cfg.bound_s, "the remote worker built no batch to partition it from")
    else:
        _until(lambda: sum(line.startswith("batch ") for _, line in progress.snapshot())
               >= cfg.trainer_batches_before_partition or trainer.poll() is not None, cfg.bound_s,
               "the trainer received no batch before the partition")
    if trainer.poll() is not None:
        raise ScenarioError("the epoch ended before the partition could start; slow the workers (pace)")
    net.partition(port=port)
    marks["fault_on"] = time.monotonic()
    time.sleep(cfg.partition_s)
    net.heal()
    marks["healed"] = time.monotonic()


# -- the table -----------------------------------------------------------------------------------


def _cell(value: float | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:g}{unit}"


def table_row(outcome: Outcome, clean: Outcome, cfg: LabConfig) -> str:
    problems = outcome.problems(cfg, clean)
    verdict = "yes" if not problems else "NO: " + "; ".join(problems)
    if outcome.link == "worker":
        if outcome.fault == "partition":
            on, healed = outcome.marks["fault_on"], outcome.marks["healed"]
            before = outcome.remote_built(on)
            during = outcome.remote_built(healed) - before
            built = f"{before} / {during} / {outcome.remote_built() - before - during}"
            seen = (f"given up after {_cell(outcome.given_up_s(), ' s')}; rejoined {_cell(outcome.rejoined_s(), ' s')}"
                    f" and building {_cell(outcome.building_again_s(), ' s')} after heal")
        else:
            built = f"{outcome.remote_built()} (of {cfg.batches})"
            silent = outcome.logs.get("server", "").count("went silent")
            seen = "never given up" if not silent else f"given up {silent} time(s)"
    else:
        built, seen = "—", "—"
    return (f"| {outcome.link} | {outcome.fault} | {clean.trainer['epoch_s']:.1f} → {outcome.trainer['epoch_s']:.1f} "
            f"| {verdict} | {built} | {outcome.redone()} | {seen} | {outcome.trainer['longest_wait_s']:.2f} |")


TABLE_HEAD = ("| link | fault | epoch s, clean → faulted | exactly once, byte-identical, no client error "
              "| remote worker's batches (partition: before / during / after) | batches redone "
              "| remote worker (partition: times from the cut / from the heal) | trainer's longest wait for a batch, s |\n"
              "|---|---|---|---|---|---|---|---|")


def table(cfg: LabConfig, workdir: Path, scenarios: list[tuple[str, str]]) -> tuple[str, bool]:
    """Run each scenario after a clean run of its link and pace; the markdown table, and whether all held."""
    data = write_dataset(workdir / "data", cfg)
    cleans: dict[tuple[str, float], Outcome] = {}
    rows, ok = [TABLE_HEAD], True
    for fault, link in scenarios:
        pace = cfg.pace_for(fault, link)
        if (link, pace) not in cleans:
            cleans[(link, pace)] = run(None, link, cfg, data, workdir / "clean", pace)
            log.info("clean %s at %g ms a sample: %.1f s", link, pace, cleans[(link, pace)].trainer["epoch_s"])
        outcome = run(fault, link, cfg, data, workdir / fault)
        clean = cleans[(link, pace)]
        ok = ok and not outcome.problems(cfg, clean) and not clean.problems(cfg, next(iter(cleans.values())))
        rows.append(table_row(outcome, clean, cfg))
        log.info("%s", rows[-1])
    return "\n".join(rows), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loader_server.tools.netlab.scenarios", description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="run all 8 scenarios and print the markdown table")
    p.add_argument("--fault", choices=FAULTS, action="append", help="only this fault (repeatable)")
    p.add_argument("--link", choices=LINKS, action="append", help="only this link (repeatable)")
    p.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temporary folder)")
    a = p.parse_args(argv)
    if not (a.table or a.fault or a.link):
        p.error("say which scenarios: --table for all, or --fault and/or --link")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    scenarios = [(f, link) for link in (a.link or LINKS) for f in (a.fault or FAULTS)]
    with tempfile.TemporaryDirectory(prefix="npyloader-netfaults-") as tmp:
        text, ok = table(LabConfig(), a.workdir or Path(tmp), scenarios)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
