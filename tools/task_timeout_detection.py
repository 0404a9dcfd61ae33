"""How soon is a hung batch noticed, and how soon does its client get it, for a given --task-timeout?

    .venv/bin/python tools/task_timeout_detection.py [--timeouts 1 2 5] [--repeats 5]

For each timeout and path, starts a server whose custom augment op hangs in `time.sleep` (GIL
released, so the worker keeps heartbeating) the first time it meets sample 21, asks for every
batch of an epoch, and reports two times: **detected**, the build time at which the worker was
killed, as the killer logs it (the server for a local worker; `npyloader worker` for a remote
one); and **recovered**, from the moment the op began to hang (its marker file's mtime) to the
client receiving that batch, redone. Paths: `local` (2 local workers, the server's timeout) and
`remote` (`--workers 0` and one `npyloader worker --processes 2 --task-timeout T`: the host kills
the process, the server notices it silent after 3 heartbeats). Heartbeats are the default 1 s.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loader_client import BatchStream
from loader_server.tools.demo import start_server

HANG_OP = '''
import os, time

def sleep_once(x, y, rng, sample=-1, marker=""):
    if int(y) == sample:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return x, y
        while True:
            time.sleep(60)
    return x, y
'''
HUNG_SAMPLE, BATCH = 21, 16
DETECTED = re.compile(r"after ([\d.]+)s[ ,(]")


def write_data(root: Path) -> Path:
    """Three files of 64 rows, 16 features and the sample id as the label; an op package beside."""
    folder = root / "data"
    folder.mkdir()
    for i in range(3):
        ids = np.arange(i * 64, (i + 1) * 64, dtype=np.float32)[:, None]
        np.save(folder / f"part-{i}.npy", np.hstack([np.repeat(ids, 16, axis=1), ids]))
    (root / "hangpkg").mkdir()
    (root / "hangpkg" / "__init__.py").write_text("")
    (root / "hangpkg" / "augs.py").write_text(HANG_OP)
    os.environ["PYTHONPATH"] = f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return folder


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_run(path: str, timeout: float, folder: Path, root: Path, run: int) -> tuple[float, float]:
    """(detected, recovered) seconds for one hang."""
    marker = root / f"marker-{path}-{timeout:g}-{run}"
    args = ["--data", str(folder), "--label-column", "-1", "--batch-size", str(BATCH), "--no-shuffle",
            "--augment", f"hangpkg.augs:sleep_once:sample={HUNG_SAMPLE},marker={marker}"]
    server_log, worker_log = root / f"server-{path}-{run}.log", root / f"worker-{path}-{run}.log"
    if path == "local":
        server, url = start_server([*args, "--workers", "2", "--task-timeout", f"{timeout:g}"], server_log)
        procs, killer_log = [server], server_log
    else:
        server, url = start_server([*args, "--workers", "0", "--worker-bind", "tcp://127.0.0.1:0"], server_log)
        endpoint = re.search(r"remote workers may join at (tcp://[^\s;]+)", server_log.read_text()).group(1)
        with open(worker_log, "w") as out:
            worker = subprocess.Popen([sys.executable, "-m", "loader_server.cli", "worker", "--connect", endpoint,
                                       "--processes", "2", "--task-timeout", f"{timeout:g}"],
                                      stdout=out, stderr=subprocess.STDOUT)
        procs, killer_log = [server, worker], worker_log
    try:
        with BatchStream(url, timeout=120) as stream:
            conn = stream._conn
            conn.request(0, list(range(len(stream))))
            conn.get(0, HUNG_SAMPLE // BATCH)
            received = time.time()
        recovered = received - marker.stat().st_mtime
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline:
            found = DETECTED.search(killer_log.read_text())
            time.sleep(0.05)
        return float(found.group(1)), recovered
    finally:
        for proc in reversed(procs):
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeouts", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", nargs="+", default=["local", "remote"], choices=["local", "remote"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="npyloader-timeout-") as tmp:
        root = Path(tmp)
        folder = write_data(root)
        print("| path | --task-timeout s | detected median s | max s | recovered median s | max s |")
        print("|---|---:|---:|---:|---:|---:|")
        for path in args.paths:
            for timeout in args.timeouts:
                runs = [one_run(path, timeout, folder, root, r) for r in range(args.repeats)]
                detected, recovered = zip(*runs)
                print(f"| {path} | {timeout:g} | {statistics.median(detected):.2f} | {max(detected):.2f} | "
                      f"{statistics.median(recovered):.2f} | {max(recovered):.2f} |", flush=True)


if __name__ == "__main__":
    main()
