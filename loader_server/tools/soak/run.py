"""`npyloader soak`: run a server, workers and clients for a long while, injecting faults, and
prove that no batch was lost or repeated.

Users leave a loader running for days next to an expensive GPU; a hung loader wastes the GPU
and a lossy one silently biases training. The soak runs the real thing (module soak_cluster),
injects one fault at a time at random but seeded moments (soak_faults), waits after each until
the system is whole again, and has the clients (soak_clients) record every sample id of every
epoch, so that what was lost or delivered twice is counted, not guessed. It ends with the
report of soak_report; any loss, repeat, client error, hang or leftover process fails it.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

from loader_server.tools.soak import data as soak_data
from loader_server.tools.soak.cluster import Cluster, SoakConfig, SoakError, tail
from loader_server.tools.soak.faults import FAULTS, Fault, FaultFailed
from loader_server.tools.soak.report import FaultRecord, SoakReport

__all__ = ["SoakConfig", "SoakError", "run"]

log = logging.getLogger(__name__)

RECOVERY_TIMEOUT_S = 90.0
FIRST_BATCH_TIMEOUT_S = 120.0
SAMPLE_EVERY_S = 0.5
STATUS_EVERY_S = 10.0
MIN_GAP_S, MAX_GAP_S = 1.0, 10.0


class _Interrupted(KeyboardInterrupt):
    """SIGTERM to the soak: stop everything it started, as Ctrl-C does."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted()


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return ", ".join(p for p in (cpu, platform.system() + " " + platform.release(),
                                 "Python " + platform.python_version()) if p)


class Soak:
    def __init__(self, root: Path, cfg: SoakConfig, command: str) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.cluster = Cluster(root, cfg, on_tick=self._tick)
        self.faults = [f for f in FAULTS if not f.needs_link or self.cluster.net.link is not None]
        self.report = SoakReport(
            command=command, machine=machine(), cores=os.cpu_count() or 1, seed=cfg.seed,
            setup=self._setup(), minutes_requested=cfg.minutes, network=self.cluster.net.describe(),
            kinds=[f.kind for f in self.faults], load_average=[os.getloadavg()[0]])
        self._reading = False
        self._read_since = 0.0
        self._next_sample = self._next_status = 0.0
        self._exited: set[str] = set()

    def _setup(self) -> dict:
        def describe(ds: soak_data.SoakDataset) -> str:
            aug = f", `--augment {' '.join(ds.augment)}`" if ds.augment else ", no augmentation"
            order = "shuffled per sample" if ds.shuffle else "in file order"
            return (f"{ds.samples:,} images of {soak_data.SIDE}x{soak_data.SIDE} float32, {ds.batches} batches of "
                    f"{ds.batch_size}, {order}{aug}")

        c = self.cfg
        return {"workers": c.workers, "heartbeat_s": c.heartbeat_s, "client_timeout_s": c.client_timeout_s,
                "task_timeout_s": c.task_timeout_s,
                "prefetch": c.prefetch, "step_ms": c.client_step_s * 1000, "client_wait_s": c.client_wait_s,
                "train": describe(soak_data.TRAIN), "val": describe(soak_data.VAL)}

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> SoakReport:
        cluster = self.cluster
        try:
            self._start()
            self._inject_faults()
            self._wind_down()
        finally:
            cleanup = cluster.close()
        self.report.leftover_processes = cleanup["leftover_processes"]
        self.report.shm_left = cleanup["shm_left"]
        self.report.load_average.append(os.getloadavg()[0])
        self.report.clients = [t.summary() for t in cluster.tallies().values()]
        self.report.memory = [{"role": m.role, "processes": len(m.pids), "peak_rss_mb": m.peak_kb / 1024,
                               "end_rss_mb": m.last_kb / 1024} for m in cluster.memory.roles.values() if m.pids]
        return self.report

    def _start(self) -> None:
        cluster = self.cluster
        if cluster.net.link is None:
            log.warning("soak: network faults (remote_loss, remote_partition) are left out: %s", cluster.net.unavailable)
        else:
            log.info("soak: the remote worker runs in network namespace %s, the rest in %s; network faults are on",
                     cluster.net.remote_host.name, cluster.net.server_host.name)
        log.info("soak: starting the server on %s (workers join at %s)", cluster.url, cluster.worker_url)
        cluster.start_server()
        cluster.start_remote()
        cluster.start_readers()
        if not cluster.wait_for(cluster.healthy, FIRST_BATCH_TIMEOUT_S):
            raise SoakError(f"the soak's clients and workers were not all running within "
                            f"{FIRST_BATCH_TIMEOUT_S:g}s; server log:\n{tail(cluster.server_log)}")
        self._reading, self._read_since = True, time.monotonic()
        log.info("soak: clients reading; injecting faults for %g minutes (seed %d)", self.cfg.minutes, self.cfg.seed)

    def _inject_faults(self) -> None:
        """Faults in a seeded shuffled cycle of all kinds, with random pauses, until the time is up
        and every kind has been injected at least once, or something failed."""
        end = self._read_since + self.cfg.minutes * 60
        mean_gap = min(MAX_GAP_S, max(MIN_GAP_S, self.cfg.minutes * 60 / (3 * len(self.faults))))
        cycle: list[Fault] = []
        while not self.report.problems and not any(not f.ok for f in self.report.faults):
            if time.monotonic() >= end and self._every_kind_injected():
                return
            if not cycle:
                cycle = self.rng.sample(self.faults, len(self.faults))
            self.cluster.pause(self.rng.uniform(0.5, 1.5) * mean_gap)
            if time.monotonic() >= end and self._every_kind_injected():
                return
            self._inject(cycle.pop(0))

    def _every_kind_injected(self) -> bool:
        return all(self.report.faults_by_kind.values())

    def _inject(self, fault: Fault) -> None:
        cluster = self.cluster
        marks = cluster.progress_marks()
        injected_at = time.monotonic()
        record = FaultRecord(fault.kind, injected_at - self._read_since)
        self.report.faults.append(record)
        log.info("soak: fault %d: %s", len(self.report.faults), fault.kind)
        try:
            done = fault.inject(cluster, self.rng)
        except (FaultFailed, SoakError) as e:
            record.ok, record.detail = False, str(e)
            log.error("soak: fault %s failed: %s", fault.kind, e)
            return
        record.detail = done.detail
        if cluster.wait_for(lambda: cluster.healthy(marks, done.gone_pid), RECOVERY_TIMEOUT_S):
            record.recovery_s = time.monotonic() - injected_at
            log.info("soak: %s; recovered in %.1fs", done.detail, record.recovery_s)
        else:
            record.ok = False
            record.detail += (f"; NOT recovered within {RECOVERY_TIMEOUT_S:g}s: the server reports "
                              f"{cluster.stats()}")
            log.error("soak: %s", record.detail)

    def _wind_down(self) -> None:
        """Let the clients finish the epoch they are in, then stop the worker and the server the
        way a user would (SIGTERM), checking that both exit cleanly."""
        cluster = self.cluster
        self._reading = False
        cluster.stop_file.touch()
        log.info("soak: letting the clients finish their epochs")
        if not cluster.wait_for(lambda: all(p.poll() is not None for p in cluster.clients.values()),
                                self.cfg.client_wait_s + 30):
            self.report.problems.append("the clients did not finish their last epoch in time")
        self.report.minutes_run = (time.monotonic() - self._read_since) / 60
        for name, proc in cluster.clients.items():
            if proc.returncode not in (0, None):
                self._client_exited(name, proc.returncode)
        assert cluster.remote is not None
        cluster.remote.send_signal(signal.SIGTERM)
        code, seconds = cluster.stop_server(signal.SIGTERM)
        if code != 0:
            self.report.problems.append(f"at the end the server exited with {code} on SIGTERM (after {seconds:.1f}s)")
        if cluster.wait_for(lambda: cluster.remote.poll() is not None, 30.0) is None or cluster.remote.returncode != 0:
            self.report.problems.append(f"at the end `npyloader worker` exited with {cluster.remote.poll()} on SIGTERM")

    def _client_exited(self, name: str, code: int | None, when: str = "") -> None:
        if name not in self._exited:
            self._exited.add(name)
            self.report.problems.append(f"client {name} exited {when}with status {code}: "
                                        f"{tail(self.cluster.logs / f'client-{name}-1.log', 5)}")

    # -- while waiting ------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_EVERY_S
            self.cluster.sample()
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            self._status()

    def _status(self) -> None:
        cluster = self.cluster
        tallies = cluster.tallies()
        if self._reading:
            for name, proc in cluster.clients.items():
                if proc.poll() is not None:
                    self._client_exited(name, proc.returncode, "early ")
        if not tallies or not self._read_since:
            return
        elapsed = time.monotonic() - self._read_since
        faults = self.report.faults
        last = ""
        if faults:
            recovered = f", recovered in {faults[-1].recovery_s:.1f}s" if faults[-1].recovery_s is not None else ""
            last = f" (last {faults[-1].kind}{recovered})"
        readers = "; ".join(f"{n} {t.epochs} epochs, {t.batches} batches" for n, t in tallies.items())
        server = cluster.memory.roles.get("server")
        log.info("soak %.0f/%.0fs: %d faults%s; %s; lost %d, duplicated %d, corrupt %d, errors %d; server RSS %.0f MB",
                 elapsed, self.cfg.minutes * 60, len(faults), last, readers,
                 sum(t.lost for t in tallies.values()), sum(t.duplicated for t in tallies.values()),
                 sum(t.corrupt_rows for t in tallies.values()), sum(len(t.errors) for t in tallies.values()),
                 (server.last_kb if server else 0) / 1024)


def run(cfg: SoakConfig, command: str, out: Path | None = None, logs: Path | None = None) -> SoakReport:
    """Soak in a private temporary folder (data, logs, the children's TMPDIR), removed at the
    end; `logs` keeps a copy of every process's log, `out` gets the Markdown and its JSON."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="npyloader-soak-") as tmp:
            soak = Soak(Path(tmp), cfg, command)
            try:
                report = soak.run()
            finally:
                if logs is not None:
                    shutil.copytree(soak.cluster.logs, logs, dirs_exist_ok=True)
                    shutil.copytree(soak.cluster.results, logs / "results", dirs_exist_ok=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if out is not None:
        report.write(out)
        log.info("wrote %s and %s", out, out.with_suffix(".json"))
    return report

