"""`npyloader bench`: throughput of npyloader next to the tutorial's generator, on the same files.

Both loaders read the same combined-layout files (64 rows each, label in the last column) and
deliver the same number of samples per epoch. The tutorial's generator is reproduced in
behaviour, not code: one batch is one whole file loaded with `np.load` inside the training
process, with `scipy.ndimage.rotate` (its default cubic spline, order=3) applied there too;
npyloader's `aug` workload asks its `rotate` op for the same order, so both do the same
work per sample. npyloader runs a real server
subprocess with worker processes and a `BatchStream` client over tcp in this process.

Each figure is the best of `--repeats` timed epochs after one warm-up epoch (files are then
in the page cache for both loaders). The client's own CPU time is reported per GB received:
the work a loader leaves on the training process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ROWS_PER_FILE = 64
READY = re.compile(r"serving .* at (tcp://\S+)")


@dataclass(frozen=True)
class Workload:
    name: str
    side: int
    samples: int
    augment: tuple[str, ...]

    @property
    def sample_bytes(self) -> int:
        return self.side * self.side * 4


WORKLOADS = {
    "io": Workload("io", 128, 4096, ()),
    "aug": Workload("aug", 64, 4096, ("rotate:degrees=15,p=0.5,order=3",)),
}


@dataclass
class Result:
    loader: str
    workload: str
    samples_per_s: float
    mb_per_s: float
    client_cpu_s_per_gb: float


def write_files(folder: Path, wl: Workload) -> None:
    """Combined layout, as in the tutorial: features then the label as the last column."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(wl.samples // ROWS_PER_FILE):
        rows = rng.random((ROWS_PER_FILE, wl.side * wl.side + 1), dtype=np.float32)
        rows[:, -1] = rng.integers(0, 10, ROWS_PER_FILE)
        np.save(folder / f"part-{i:04d}.npy", rows)


def tutorial_epoch(folder: Path, wl: Workload, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The seed tutorial's behaviour: a batch is one file, loaded whole, augmented in-process."""
    from scipy.ndimage import rotate

    files = sorted(folder.glob("*.npy"))
    order = np.random.default_rng(epoch).permutation(len(files))
    for i in order:
        data = np.load(files[i])
        x, y = data[:, :-1].reshape(-1, wl.side, wl.side), data[:, -1]
        if wl.augment:
            rng = np.random.default_rng([epoch, int(i)])
            x = np.stack([rotate(s, rng.uniform(-15, 15), reshape=False) if rng.random() < 0.5 else s for s in x])
        yield x, y


def measure(epochs: Callable[[int], Iterator[tuple[np.ndarray, ...]]], repeats: int) -> tuple[float, int, float]:
    """Best epoch time, bytes per epoch and client CPU seconds of that epoch, after a warm-up."""
    for _ in epochs(0):
        pass
    best = (float("inf"), 0, 0.0)
    for r in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        nbytes = sum(sum(a.nbytes for a in batch) for batch in epochs(r + 1))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, nbytes, cpu)
    return best


def to_result(loader: str, wl: Workload, wall: float, nbytes: int, cpu: float) -> Result:
    return Result(loader, wl.name, wl.samples / wall, nbytes / wall / 1e6, cpu / (nbytes / 1e9))


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "loader_server.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _serve_args(folder: Path, wl: Workload, workers: int) -> list[str]:
    args = ["serve", "--data", str(folder), "--label-column", "-1", "--x-shape", f"{wl.side},{wl.side}",
            "--batch-size", str(ROWS_PER_FILE), "--workers", str(workers), "--bind", "tcp://127.0.0.1:0"]
    for spec in wl.augment:
        args += ["--augment", spec]
    return args


def _stream_result(url: str, loader: str, wl: Workload, repeats: int) -> Result:
    from loader_client import BatchStream

    with BatchStream(url, timeout=60, prefetch=16) as stream:
        wall, nbytes, cpu = measure(lambda e: iter(stream), repeats)
    return to_result(loader, wl, wall, nbytes, cpu)


def run_npyloader(folder: Path, wl: Workload, workers: int, repeats: int, log_dir: Path) -> Result:
    log_path = log_dir / f"server-{wl.name}-{workers}.log"
    proc = _start(_serve_args(folder, wl, workers), log_path)
    try:
        return _stream_result(_wait_ready(proc, log_path), f"npyloader tcp, {workers} workers", wl, repeats)
    finally:
        proc.terminate()
        proc.wait(30)


def run_scale_out(folder: Path, wl: Workload, repeats: int, log_dir: Path) -> list[Result]:
    """One local worker, then the same server with a remote worker (`npyloader worker` over
    loopback tcp) joined: what adding a host's worker buys, measured in one run."""
    from loader_client import request_stats

    log_path = log_dir / f"server-{wl.name}-scale.log"
    server = _start([*_serve_args(folder, wl, 1), "--worker-bind", "tcp://127.0.0.1:0"], log_path)
    worker = None
    try:
        url = _wait_ready(server, log_path)
        joined = re.search(r"remote workers may join at (tcp://[^\s;]+)", log_path.read_text()).group(1)
        results = [_stream_result(url, "npyloader tcp, 1 local worker", wl, repeats)]
        worker = _start(["worker", "--connect", joined, "--processes", "1"], log_dir / "worker-scale.log")
        deadline = time.monotonic() + 60
        while len(request_stats(url)["workers"]["list"]) < 2:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"the remote worker did not join; see {log_dir / 'worker-scale.log'}")
            time.sleep(0.05)
        results.append(_stream_result(url, "npyloader tcp, 1 local + 1 remote worker", wl, repeats))
        return results
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text())
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"bench server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"bench server not ready within {timeout:g}s; see {log_path}")


def run(workloads: list[str], workers: int, repeats: int, quick: bool, scale_out: bool = True) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="npyloader-bench-") as tmp:
        for name in workloads:
            wl = WORKLOADS[name]
            if quick:
                wl = Workload(wl.name, wl.side, 8 * ROWS_PER_FILE, wl.augment)
            folder = Path(tmp) / name
            log.info("bench %s: writing %d samples of %dx%d float32", name, wl.samples, wl.side, wl.side)
            write_files(folder, wl)
            log.info("bench %s: tutorial generator (file = batch, in-process)", name)
            wall, nbytes, cpu = measure(lambda e: tutorial_epoch(folder, wl, e), repeats)
            results.append(to_result("tutorial generator", wl, wall, nbytes, cpu))
            log.info("bench %s: npyloader, %d workers over tcp", name, workers)
            results.append(run_npyloader(folder, wl, workers, repeats, Path(tmp)))
            if scale_out and wl.augment:
                log.info("bench %s: 1 local worker, then 1 local + 1 remote worker", name)
                results.extend(run_scale_out(folder, wl, repeats, Path(tmp)))
    return results


def markdown(results: list[Result], command: str) -> str:
    lines = [f"Measured with `{command}` on {os.cpu_count()} cores.", "",
             "| workload | loader | samples/s | MB/s | client CPU s per GB |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.workload} | {r.loader} | {r.samples_per_s:,.0f} | {r.mb_per_s:,.0f} | "
                     f"{r.client_cpu_s_per_gb:.2f} |")
    by = {(r.workload, r.loader.startswith("npyloader")): r for r in results if "local" not in r.loader}
    for wl in dict.fromkeys(r.workload for r in results):
        if (wl, True) in by and (wl, False) in by:
            ratio = by[(wl, True)].samples_per_s / by[(wl, False)].samples_per_s
            lines.append(f"\n{wl}: npyloader delivers {ratio:.2f}x the tutorial generator's samples/s.")
    scale = [r for r in results if "local" in r.loader]
    if len(scale) == 2:
        lines.append(f"\n{scale[0].workload}: adding a remote worker to one local worker gives "
                     f"{scale[1].samples_per_s / scale[0].samples_per_s:.2f}x the samples/s.")
    return "\n".join(lines) + "\n"


def main(workloads: list[str], workers: int, repeats: int, quick: bool, out: str | None, as_json: bool) -> str:
    results = run(workloads, workers, repeats, quick)
    command = "npyloader bench" + (" --quick" if quick else "")
    text = json.dumps([asdict(r) for r in results], indent=2) if as_json else markdown(results, command)
    if out:
        Path(out).write_text(text)
        log.info("wrote %s", out)
    return text
