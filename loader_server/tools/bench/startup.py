"""`npyloader bench --startup`: seconds from `npyloader serve` to a client's first batch.

The case is the seed's own: one sample per file (8x8 float32), 100,000 files and a labels file,
`--layout per-sample`. The clock starts just before the server process is started (so Python's
own start and every import count) and stops when a `BatchStream` holds batch 0. Each case is
run `repeats` times and the median kept, because on a shared machine one run says little:

- cold: `--no-index-cache`, every header read (the files themselves are in the page cache);
- writing the cache: an empty `--index-cache` folder, so indexing plus writing the cache;
- from the cache: the same folder again, so the index comes from the cache.

Each run also records the CPU seconds every process of the server had used by the first
batch, which says where the time went (the server's indexing, or its workers' start-up).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loader_server.tools.bench.procs import (
    children,
    cpu_seconds,
    npyloader_process,
    stop,
)
from loader_server.tools.bench.workload import write_small_files
from loader_server.tools.local_server import READY, wait_for_line

log = logging.getLogger(__name__)

FILES = 100_000
CASES = ("cold (--no-index-cache)", "cold, writing the index cache", "from the index cache")
POLL_S = 0.005


@dataclass(frozen=True)
class Startup:
    """One start: when the server said it was serving, when the client had batch 0, and the
    CPU seconds each of the server's processes had spent by then."""

    ready_s: float
    first_batch_s: float
    cpu_s: dict[str, float]


def data_paths(folder: Path) -> tuple[Path, Path]:
    """The one-sample files' folder and their labels file, as `write_small_files` lays them out."""
    return folder, folder.parent / "small-labels.npy"


def one_start(folder: Path, cache: Path | None, workers: int, log_path: Path) -> Startup:
    """Start `npyloader serve` over the one-sample files and time it to the first batch."""
    from loader_client import (
        BatchStream,  # imported before the clock starts: not the server's cost
    )

    data, labels = data_paths(folder)
    cache_flags = ["--no-index-cache"] if cache is None else ["--index-cache", str(cache)]
    started = time.perf_counter()
    server = npyloader_process("serve", "--data", str(data), "--layout", "per-sample", "--labels", str(labels),
                               "--batch-size", "64", "--workers", str(workers), "--bind", "tcp://127.0.0.1:0",
                               *cache_flags, log_path=log_path)
    try:
        url = wait_for_line(server, log_path, READY, interval=POLL_S)
        ready = time.perf_counter() - started
        with BatchStream(url, timeout=120) as stream:
            next(iter(stream))
        first = time.perf_counter() - started
        cpu = cpu_by_role(server.pid)
    finally:
        stop(server)
    return Startup(ready, first, cpu)


def cpu_by_role(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a server and of its children, named by role (a second
    worker is "worker 2", in pid order)."""
    out: dict[str, float] = {}
    for role, p in [("server", pid)] + [(_role(c), c) for c in sorted(children(pid))]:
        try:
            seconds = cpu_seconds(p)
        except OSError:
            continue
        key = role if role not in out else f"{role} {sum(k.startswith(role) for k in out) + 1}"
        out[key] = seconds
    return out


def _role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "child"
    return "resource tracker" if b"resource_tracker" in cmdline else "worker"


def measure(folder: Path, repeats: int, workers: int = 1) -> dict[str, list[Startup]]:
    """Every case `repeats` times, interleaved so a busy moment on the machine hits each case alike."""
    runs: dict[str, list[Startup]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="npyloader-startup-") as tmp:
        cache = Path(tmp) / "index-cache"
        log_path = Path(tmp) / "server.log"
        for r in range(repeats):
            shutil.rmtree(cache, ignore_errors=True)
            for case, case_cache in zip(CASES, (None, cache, cache)):
                run = one_start(folder, case_cache, workers, log_path)
                log.info("startup run %d, %s: ready %.2f s, first batch %.2f s", r + 1, case, run.ready_s,
                         run.first_batch_s)
                runs[case].append(run)
    return runs


def first_batch_times(folder: Path, count: int, repeats: int = 1) -> dict[str, float]:
    """Median seconds to the first batch over `count` one-sample files (written first), cold
    and from the index cache: the figures `npyloader bench` reports."""
    log.info("bench: time to first batch over %d one-sample files (writing them first)", count)
    write_small_files(folder, count)
    runs = measure(folder, repeats)
    return {f"{count:,} files, {case}": statistics.median(r.first_batch_s for r in runs[case])
            for case in (CASES[0], CASES[2])}


def report(runs: dict[str, list[Startup]], count: int, command: str) -> str:
    """A Markdown table of medians, with each process's median CPU seconds by the first batch."""
    lines = [f"Time to first batch over {count:,} one-sample files, measured with `{command}` on "
             f"{os.cpu_count()} cores; medians of {len(next(iter(runs.values())))} runs.", "",
             "| case | ready s | first batch s | CPU s by process at the first batch |", "|---|---:|---:|---|"]
    for case, rs in runs.items():
        roles = dict.fromkeys(k for r in rs for k in r.cpu_s)
        cpu = ", ".join(f"{role} {statistics.median(r.cpu_s.get(role, 0.0) for r in rs):.2f}" for role in roles)
        lines.append(f"| {case} | {statistics.median(r.ready_s for r in rs):.2f} | "
                     f"{statistics.median(r.first_batch_s for r in rs):.2f} | {cpu} |")
    return "\n".join(lines) + "\n"


def main(count: int, repeats: int, workers: int, folder: Path | None = None) -> str:
    """`npyloader bench --startup`: write the files (once, if `folder` is given), measure, report."""
    command = f"npyloader bench --startup --files {count} --repeats {repeats} --workers {workers}"
    with tempfile.TemporaryDirectory(prefix="npyloader-startup-data-") as tmp:
        folder = folder or Path(tmp) / "small"
        if not (folder.is_dir() and len(os.listdir(folder)) == count and data_paths(folder)[1].exists()):
            write_small_files(folder, count)
        return report(measure(folder, repeats, workers), count, command)

