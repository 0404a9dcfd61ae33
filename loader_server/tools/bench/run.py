"""`npyloader bench`: npyloader next to the loaders a Keras user would otherwise pick, in one run.

Every loader reads the same combined-layout files (64 rows each, label in the last column) and
follows the same plan: batches of 64, a per-sample shuffle each epoch, 2 workers where a loader
has workers, and for `aug` the tutorial's own `scipy.ndimage.rotate` (cubic, p=0.5) per sample.
Each loader is measured in a fresh child process, so one loader's imports and memory (TensorFlow
is large) never count against another, and that process's CPU time and peak RSS are exactly
what the loader costs the training process. Figures are the best of `--repeats` timed epochs
after one warm-up epoch (files are then in the page cache for everyone).

Also measured: the ceilings (raw pyzmq PUSH/PULL between two processes over tcp and ipc, and
memcpy), the time to the first batch over 100,000 one-sample files from a cold start and from
the index cache, and the server's private memory at two dataset sizes (it memory-maps, so it
should not grow with the data).
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from loader_server.tools.bench.harness import THROUGH_FIT
from loader_server.tools.bench.procs import peak_rss_mb
from loader_server.tools.bench.serving import epochs_per_call, npyloader_run
from loader_server.tools.bench.startup import first_batch_times
from loader_server.tools.bench.workload import (
    ROWS_PER_FILE,
    WORKLOADS,
    Workload,
    write_files,
)

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S = 900


# baselines.ALL's keys, each loader's row through fit after its own; kept here so that the
# parent process never imports TensorFlow (tests check the two agree).
BASELINES = ("keras-threads", "keras-threads-fit", "keras-processes", "keras-processes-fit",
             "tf-numpy-function", "tf-pure", "torch-per-sample", "torch-per-sample-fit",
             "torch-batch", "torch-batch-fit", "grain", "grain-fit")


@dataclass
class Result:
    loader: str
    workload: str
    samples_per_s: float = 0.0
    mb_per_s: float = 0.0
    client_cpu_s_per_gb: float = 0.0
    client_rss_mb: float = 0.0
    server_rss_mb: float | None = None
    worker_rss_mb: float | None = None
    server_private_mb: float | None = None
    workers: int = 0
    note: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    ceilings: dict[str, float] = field(default_factory=dict)
    first_batch: dict[str, float] = field(default_factory=dict)
    server_rss_by_size: dict[str, float] = field(default_factory=dict)
    routing: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# -- one loader, in a child process ----------------------------------------------------------

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
    """Best epoch time, bytes per epoch and this process's CPU seconds in that epoch, after a warm-up."""
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


def run_child(spec: dict[str, Any]) -> Result:
    """Measure one loader on one workload in this (fresh) process."""
    wl = Workload(**{**spec["workload"], "augment": tuple(spec["workload"]["augment"])})
    folder, kind, workers = Path(spec["folder"]), spec["loader"], spec["workers"]
    result = Result(loader=spec["name"], workload=wl.name, workers=workers)
    with tempfile.TemporaryDirectory(prefix="npyloader-bench-child-") as tmp:
        if kind == "tutorial":
            epochs, close = (lambda e: tutorial_epoch(folder, wl, e)), (lambda: {})
        elif kind == "npyloader":
            epochs, close = npyloader_run(spec, folder, wl, Path(tmp))
        else:
            from loader_server.tools.bench import baselines as bench_baselines

            baseline = bench_baselines.ALL[kind](folder, wl, workers)
            result.loader = baseline.name
            epochs, close = baseline.epoch, lambda: baseline.close() or {}
        try:
            wall, nbytes, cpu = measure(epochs, spec["repeats"])
        finally:
            memory = close()
    result.samples_per_s = wl.samples * epochs_per_call(spec) / wall
    result.mb_per_s = nbytes / wall / 1e6
    result.client_cpu_s_per_gb = cpu / (nbytes / 1e9)
    result.client_rss_mb = peak_rss_mb()
    for key, value in memory.items():
        setattr(result, key, value)
    return result


def child_main() -> None:
    """`python -m loader_server.tools.bench.run SPEC_JSON RESULT_PATH`: measure, write the Result as JSON."""
    logging.basicConfig(level=logging.WARNING)
    Path(sys.argv[2]).write_text(json.dumps(asdict(run_child(json.loads(sys.argv[1])))))


# -- the whole run ---------------------------------------------------------------------------

def _in_child(spec: dict[str, Any]) -> Result | str:
    """A Result, or the reason the loader could not be measured here."""
    with tempfile.TemporaryDirectory(prefix="npyloader-bench-result-") as tmp:
        result_path = Path(tmp) / "result.json"
        try:
            done = subprocess.run([sys.executable, "-m", "loader_server.tools.bench.run", json.dumps(spec), str(result_path)],
                                  capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"did not finish within {CHILD_TIMEOUT_S}s"
        if done.returncode != 0:
            unavailable = re.search(r"BaselineUnavailable: (.*)", done.stderr)
            return unavailable.group(1) if unavailable else f"failed: {done.stderr.strip().splitlines()[-1:]}"
        return Result(**json.loads(result_path.read_text()))


def loader_specs(workers: int, max_workers: int) -> list[tuple[str, dict[str, Any]]]:
    specs: list[tuple[str, dict[str, Any]]] = [("tutorial generator (in-process)", {"loader": "tutorial", "workers": 0})]
    for n in range(1, max_workers + 1):
        specs.append((f"npyloader tcp, {n} worker{'s' * (n > 1)}", {"loader": "npyloader", "workers": n, "transport": "tcp"}))
    specs.append((f"npyloader ipc, {workers} workers", {"loader": "npyloader", "workers": workers, "transport": "ipc"}))
    for n in range(1, max_workers + 1):
        specs.append((f"npyloader shm, {n} worker{'s' * (n > 1)}", {"loader": "npyloader", "workers": n, "transport": "shm"}))
    shm = {"loader": "npyloader", "workers": workers, "transport": "shm"}
    specs.append((f"npyloader shm, {workers} workers, consumer copies each batch", {**shm, "copy": True}))
    specs.append((f"npyloader shm, {workers} workers, 4 clients at once (aggregate)", {**shm, "clients": 4}))
    specs.append((f"npyloader shm, {workers} workers{THROUGH_FIT}", {**shm, "fit": True}))
    specs.append((f"npyloader tcp, {workers} workers{THROUGH_FIT}", {**shm, "transport": "tcp", "fit": True}))
    specs += [(key, {"loader": key, "workers": workers}) for key in BASELINES]
    return specs


def run(workloads: list[str], workers: int, repeats: int, quick: bool) -> Report:
    from loader_server.tools.bench import ceilings as bench_ceilings

    report = Report()
    max_workers = max(workers, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="npyloader-bench-") as tmp:
        root = Path(tmp)
        for name in workloads:
            wl = WORKLOADS[name]
            if quick:
                wl = replace(wl, samples=8 * ROWS_PER_FILE)
            folder = root / name
            log.info("bench %s: writing %d samples of %dx%d float32", name, wl.samples, wl.side, wl.side)
            write_files(folder, wl)
            specs = loader_specs(workers, max_workers)
            if wl.augment:
                specs.append(("npyloader tcp, 1 local + 1 remote worker",
                              {"loader": "npyloader", "workers": 1, "transport": "tcp", "remote": 1}))
            for label, spec in specs:
                log.info("bench %s: %s", name, label)
                outcome = _in_child({**spec, "name": label, "folder": str(folder), "workload": asdict(wl),
                                     "repeats": repeats})
                if isinstance(outcome, str):
                    report.skipped[f"{name}: {label}"] = outcome
                    log.warning("bench %s: %s skipped: %s", name, label, outcome)
                else:
                    report.results.append(outcome)
        frame = WORKLOADS["io"].sample_bytes * ROWS_PER_FILE
        seconds = 0.5 if quick else 3.0
        log.info("bench: ceilings (raw pyzmq tcp and ipc, memcpy) with %d-byte frames", frame)
        report.ceilings = {"raw pyzmq tcp": bench_ceilings.raw_zmq("tcp", frame, seconds) / 1e6,
                           "raw pyzmq ipc": bench_ceilings.raw_zmq("ipc", frame, seconds) / 1e6,
                           "memcpy": bench_ceilings.memcpy(frame, seconds) / 1e6}
        report.first_batch = first_batch_times(root / "small", 5_000 if quick else 100_000)
        report.server_rss_by_size = server_rss_by_size(root, repeats, quick)
    from loader_server.tools.bench import broker

    report.routing = [asdict(r) for r in broker.run(1.0 if quick else 5.0)]
    return report


def server_rss_by_size(root: Path, repeats: int, quick: bool) -> dict[str, float]:
    """The server's own memory (server and workers, anonymous pages) after serving the io
    workload at two sizes: it memory-maps files, so this should not grow with the data."""
    sizes = (512, 2048) if quick else (4096, 16384)
    out = {}
    for samples in sizes:
        wl = replace(WORKLOADS["io"], samples=samples)
        folder = root / f"io-{samples}"
        write_files(folder, wl)
        spec = {"loader": "npyloader", "workers": 2, "transport": "tcp", "name": "rss", "folder": str(folder),
                "workload": asdict(wl), "repeats": 1}
        outcome = _in_child(spec)
        if isinstance(outcome, Result):
            out[f"{samples * wl.sample_bytes / 2**20:,.0f} MiB dataset"] = outcome.server_private_mb or 0.0
    return out


# -- reporting -------------------------------------------------------------------------------

METHOD = """Every loader reads the same combined-layout files (64 rows of float32 each, label in the last
column) and follows one plan: batches of 64, a per-sample shuffle each epoch, 2 workers where a
loader has workers, and for `aug` the tutorial's own cubic `scipy.ndimage.rotate` (p=0.5) per
sample (the pure-TF pipeline can only rotate bilinearly, which is cheaper). `io` is 4,096 samples
of 128x128 (256 MiB), `aug` 4,096 of 64x64. Each loader runs in a fresh child process; a figure is
the best of the timed epochs after one warm-up epoch (files in the page cache for everyone).

The peers deliver the plan's own batches, order and rotation, not their library's shuffle:
Keras `PyDataset` with threads or `use_multiprocessing` (its `__getitem__` builds a whole batch;
queue of 16), iterated through Keras's adapter as `fit` does on the JAX and NumPy backends;
tf.data running the same Python batch function (`numpy_function`), and pure TF; torch
`DataLoader` per sample (`batch_size=64`, a sampler in the plan's order, numpy collate) and with
a batch per item (`__getitem__` returns the plan's whole batch, `batch_size=None`: no per-sample
indexing, no collate), both with persistent workers; Google Grain's Dataset API,
`MapDataset.source -> map(rotate) -> batch(64) -> to_iter_dataset(ReadOptions(num_threads=0,
prefetch_buffer_size=0)) -> mp_prefetch(num_workers=2, per_worker_buffer_size=8)`, one iterator
across epochs (0 read threads as `ReadOptions` advises for data in memory; 16 batches buffered in
all, as Keras's queue; `grain.DataLoader` is not used because it batches inside each worker after
dealing samples round-robin, so its batches are not the plan's). Rows ending "through fit" are
what `model.fit` receives on the TensorFlow backend: the same loader handed to fit
(`shuffle=False`), each batch pulled through Keras's own `TFEpochIterator` and data adapter
(PyDataset, torch DataLoader, Grain), that is through `adapter.get_tf_dataset()`, as tensors.
tf.data rows need no such row: fit iterates a dataset as given. Rows whose package is missing
(torch, grain) are listed under "Not measured here".

"Trainer" columns are that process's own CPU seconds per GB received and its peak RSS; server
columns are the npyloader server's and its largest worker's peak RSS, which include mapped file
pages (page cache). Analysis of the figures: [PERFORMANCE.md](PERFORMANCE.md)."""


def markdown(report: Report, command: str, image: str | None = None) -> str:
    lines = ["# Benchmarks", "", f"Measured with `{command}` on {os.cpu_count()} cores, in one run; this file, "
             "its JSON and its plot are written by that command.", "", METHOD, ""]
    if image:
        lines += [f"![throughput by loader and scaling by workers]({image})", ""]
    for wl in dict.fromkeys(r.workload for r in report.results):
        rows = [r for r in report.results if r.workload == wl]
        lines += [f"### {wl}", "", "| loader | samples/s | MB/s | trainer CPU s per GB | trainer peak RSS MB | "
                  "server + worker peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            server = "" if r.server_rss_mb is None else f"{r.server_rss_mb:,.0f} + {r.worker_rss_mb or 0:,.0f}"
            lines.append(f"| {r.loader} | {r.samples_per_s:,.0f} | {r.mb_per_s:,.0f} | {r.client_cpu_s_per_gb:.2f} | "
                         f"{r.client_rss_mb:,.0f} | {server} |")
        lines.append("")
    if report.ceilings:
        lines += ["### Ceilings (4 MiB frames, two processes)", "", "| path | MB/s |", "|---|---:|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in report.ceilings.items()] + [""]
    if report.first_batch:
        lines += ["### Time to first batch", "", "| case | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report.first_batch.items()] + [""]
    if report.server_rss_by_size:
        lines += ["### Server memory against dataset size (io, 2 workers)", "",
                  "Private (anonymous) memory of the server and its workers after an epoch; mapped file "
                  "pages are page cache, shared and reclaimable, so they are not counted here.", "",
                  "| dataset | server + workers private MB |", "|---|---:|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in report.server_rss_by_size.items()] + [""]
    if report.routing:
        lines += ["### Routing: tiny batches, the server's own CPU per batch", "",
                  "One-sample batches (32 bytes), so routing is all the work there is: the server process's CPU "
                  "per batch bounds how many batches one server routes (see PERFORMANCE.md's capacity model).", "",
                  "| case | batches/s | server CPU µs per batch | server CPU share of a core |", "|---|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['batches_per_s']:,.0f} | {r['server_cpu_us_per_batch']:,.0f} | "
                  f"{r['server_cpu_share']:.0%} |" for r in report.routing] + [""]
    if report.skipped:
        lines += ["### Not measured here", ""] + [f"- {k}: {v}" for k, v in report.skipped.items()] + [""]
    lines += ["### Targets", ""] + [f"- {t}" for t in targets(report)]
    return "\n".join(lines) + "\n"


def _find(report: Report, workload: str, prefix: str) -> Result | None:
    return next((r for r in report.results if r.workload == workload and r.loader.startswith(prefix)), None)


def targets(report: Report) -> list[str]:
    """The performance issues' targets, each with its ratio from this run."""
    out = []
    raw = report.ceilings.get("raw pyzmq tcp")
    shm = next((r for r in report.results if r.workload == "io" and r.loader == "npyloader shm, 2 workers"), None)
    if shm and raw:
        out.append(f"io over shm: {shm.mb_per_s:,.0f} MB/s, {shm.mb_per_s / raw:.2f}x raw pyzmq tcp ({raw:,.0f}; "
                   "target >= 1.6x)")
        in_process = [r for r in report.results if r.workload == "io" and THROUGH_FIT not in r.loader
                      and r.loader.startswith(("keras PyDataset, ", "tf.data numpy_function"))
                      and "use_multiprocessing" not in r.loader]
        if in_process:
            best = max(in_process, key=lambda r: r.mb_per_s)
            out.append(f"io over shm vs the best in-process loader on the per-sample plan, {best.loader}: "
                       f"{shm.mb_per_s / best.mb_per_s:.2f}x (target >= 1)")
        fit = _find(report, "io", f"npyloader shm, 2 workers{THROUGH_FIT}")
        if fit:
            out.append(f"io over shm through fit: {fit.mb_per_s:,.0f} MB/s, {fit.mb_per_s / shm.mb_per_s:.2f}x the "
                       "BatchStream figure (target >= 0.8x)")
        out.append(f"trainer CPU per GB over shm: {shm.client_cpu_s_per_gb:.2f} s (target <= 0.1)")
        many = _find(report, "io", "npyloader shm, 2 workers, 4 clients")
        if many:
            out.append(f"4 shm clients at once: {many.mb_per_s:,.0f} MB/s in all, {many.mb_per_s / shm.mb_per_s:.2f}x "
                       "one client (target >= 1.0x)")
    aug = max((r for r in report.results if r.workload == "aug" and r.workers == 2 and "remote" not in r.loader
               and r.loader.startswith(("npyloader shm, 2 workers", "npyloader tcp, 2 workers"))
               and THROUGH_FIT not in r.loader and "clients" not in r.loader and "copies" not in r.loader),
              key=lambda r: r.samples_per_s, default=None)
    rivals = [r for r in report.results if r.workload == "aug" and THROUGH_FIT not in r.loader and r.loader.startswith(
        ("keras PyDataset, use_multiprocessing", "tf.data numpy_function", "torch DataLoader", "grain"))]
    if aug and rivals:
        best = max(rivals, key=lambda r: r.samples_per_s)
        out.append(f"aug: {aug.loader} {aug.samples_per_s:,.0f} samples/s vs the best alternative, {best.loader}, "
                   f"{best.samples_per_s:,.0f} ({aug.samples_per_s / best.samples_per_s:.2f}x; target >= 1.2x)")
    for case, seconds in report.first_batch.items():
        out.append(f"first batch, {case}: {seconds:.2f} s (target < 3 s cold, < 1.5 s from the index cache)")
    return out


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    most_rows = max((sum(r.workload == wl for r in report.results) for wl in ("io", "aug")), default=0)
    fig, axes = plt.subplots(1, 3, figsize=(17, max(5.5, 0.3 * most_rows)))
    for ax, (wl, metric, unit) in zip(axes, (("io", "mb_per_s", "MB/s"), ("aug", "samples_per_s", "samples/s"))):
        rows = [r for r in report.results if r.workload == wl]
        ax.barh([r.loader for r in rows], [getattr(r, metric) for r in rows],
                color=["tab:blue" if r.loader.startswith("npyloader") else "tab:gray" for r in rows])
        if wl == "io":
            for name, value in report.ceilings.items():
                if name.startswith("raw"):
                    ax.axvline(value, linestyle="--", color="tab:red" if "tcp" in name else "tab:orange", label=name)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{wl}: {unit}")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    ax = axes[2]
    for wl, metric in (("io", "mb_per_s"), ("aug", "samples_per_s")):
        scaling = sorted((r.workers, getattr(r, metric)) for r in report.results
                         if r.workload == wl and r.loader.startswith("npyloader tcp") and "remote" not in r.loader)
        if scaling:
            base = scaling[0][1]
            ax.plot([w for w, _ in scaling], [v / base for _, v in scaling], marker="o", label=f"{wl} ({metric})")
    ax.set_title("npyloader speed-up vs 1 worker")
    ax.set_xlabel("local workers")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(workloads: list[str], workers: int, repeats: int, quick: bool, out: str | None) -> str:
    report = run(workloads, workers, repeats, quick)
    command = "npyloader bench" + (" --quick" if quick else "") + (f" --out {out}" if out else "")
    text = markdown(report, command, Path(out).with_suffix(".png").name if out else None)
    if out:
        md = Path(out)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        md.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2))
        plot(report, md.with_suffix(".png"))
        log.info("wrote %s, %s and %s", md, md.with_suffix(".json"), md.with_suffix(".png"))
    return text


if __name__ == "__main__":
    child_main()
