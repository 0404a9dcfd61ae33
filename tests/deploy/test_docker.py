"""The Docker deployment: docker/Dockerfile, compose.yaml and docker/compose.yaml, tools/local-docker.sh.

Tests marked `docker` run the real thing: `tools/local-docker.sh up` (root: installs docker.io,
docker-compose and debootstrap with apt when missing, starts a private dockerd, imports a
debootstrap base image), `docker build` of npyloader:local FROM that base, then the compose
project from the repository root with a loader that has no local workers and two worker
containers, on a small id dataset mounted read-only. A client on this host reads through the
published port: a full epoch exactly once; an epoch during which a worker container is killed;
the loader's healthcheck, user and mounts; a clean stop of the loader and the workers rejoining
its restart. A second project runs a loader with one local worker, whose shared-memory slots
trainer containers read: the compose `trainer` service (the loader's IPC namespace, its uid)
over shm; a container without that IPC namespace, and the trainer service as another uid, over
the socket, each saying why; the same bytes every way. The module is skipped, with the reason,
when the engine cannot be started (not root, no apt, dockerd fails); NPYLOADER_REQUIRE_DOCKER=1
turns that skip into a failure.

The compose projects are always taken down (`down -v --remove-orphans`), pass or fail, and every
one-off container a test starts is removed by it; the engine and its images stay for the next
run (`tools/local-docker.sh down` stops the engine).

The unmarked test reads both compose files without an engine: PyYAML, else `docker-compose
config`, else it is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from loader_client import BatchStream
from tests.helpers import free_port, wait_for, write_id_dataset

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "local-docker.sh"
COMPOSE_FILES = {"root": ROOT / "compose.yaml", "docker": ROOT / "docker" / "compose.yaml"}
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
DOCKER_HOST = "unix:///tmp/npyloader-docker/docker.sock"
IMAGE = "npyloader:local"
BASE_IMAGE = "npyloader-base:bookworm"
ROWS_PER_FILE = [50, 37, 41, 60, 15]  # 203 samples: batch 16 gives 13 batches, the last partial
BATCH_SIZE = 16
SETUP_TIMEOUT = 900  # a cold machine: apt, debootstrap, pip inside docker build
TIMED_OUT = -1000  # _stream's status for a command it had to kill


# -- progress lines and commands ------------------------------------------------------------------

def _progress(config: pytest.Config, message: str, *, first: bool = True) -> None:
    """A line on the terminal now, past pytest's output capture: the setup takes minutes cold."""
    capman = config.pluginmanager.getplugin("capturemanager")
    line = f"{chr(10) if first else ''}[docker {time.strftime('%H:%M:%S')}] {message}"
    if capman is None:
        print(line, file=sys.stderr, flush=True)
        return
    with capman.global_and_fixture_disabled():
        print(line, file=sys.stderr, flush=True)


def _run(argv: list[str], env: dict[str, str], log: Path, timeout: float, what: str) -> str:
    """Run a command with its output appended to `log`; fail with the log's tail naming `what`."""
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
        f.flush()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{what} took more than {timeout:.0f}s; log {log}:\n{_tail(log)}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed with status {proc.returncode}; log {log}:\n{_tail(log)}")
    return log.read_text(errors="replace")


def _stream(config: pytest.Config, argv: list[str], env: dict[str, str], log: Path, timeout: float,
            show: re.Pattern[str]) -> int:
    """Run a long command with its output in `log`, echoing the lines that `show` matches as they
    come (progress); killed after `timeout` seconds. Returns its exit status, or TIMED_OUT."""
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace")
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if show.search(line):
                    _progress(config, "  " + line.rstrip()[:160], first=False)
            status = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return TIMED_OUT if timed_out.is_set() else status


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _compose_argv() -> list[str]:
    """`docker-compose` (v1.29 here); NPYLOADER_COMPOSE="docker compose" runs the same tests with v2."""
    return shlex.split(os.environ.get("NPYLOADER_COMPOSE", "docker-compose"))


# -- the engine, the image, the compose project ---------------------------------------------------

@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment pointing docker and docker-compose at tools/local-docker.sh's engine."""
    def unavailable(reason: str) -> None:
        if os.environ.get("NPYLOADER_REQUIRE_DOCKER") == "1":
            pytest.fail(f"NPYLOADER_REQUIRE_DOCKER=1 but the docker engine is unavailable: {reason}")
        pytest.skip(f"docker engine unavailable: {reason}")

    if os.environ.get("NPYLOADER_DOCKER_UNAVAILABLE"):  # make test already tried, and says why
        unavailable(os.environ["NPYLOADER_DOCKER_UNAVAILABLE"])
    log = tmp_path_factory.mktemp("docker-logs") / "local-docker.log"
    _progress(request.config, f"tools/local-docker.sh up (log: {log})")
    started = time.monotonic()
    status = _stream(request.config, ["bash", str(SCRIPT), "up"], dict(os.environ), log, SETUP_TIMEOUT,
                     re.compile(r"^local-docker: (?!error)"))
    output = log.read_text(errors="replace")
    if status == TIMED_OUT:
        unavailable(f"tools/local-docker.sh up took more than {SETUP_TIMEOUT}s (log: {log})")
    if status != 0:
        # The script's last word is one line: "local-docker: error: <why>" (not root, apt, dockerd).
        errors = [ln.removeprefix("local-docker: error: ") for ln in output.splitlines()
                  if ln.startswith("local-docker: error: ")]
        unavailable(errors[-1] if errors else f"tools/local-docker.sh up exited {status}: "
                    f"{output.strip()[-300:] or 'no output'}")
    _progress(request.config, f"engine up in {time.monotonic() - started:.0f}s")
    for tool in ("docker", _compose_argv()[0]):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not on PATH after tools/local-docker.sh up")
    return {**os.environ, "DOCKER_HOST": DOCKER_HOST}


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest, engine: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """npyloader:local built from docker/Dockerfile FROM the debootstrap base (cached layers: seconds)."""
    log = tmp_path_factory.mktemp("docker-build") / "build.log"
    _progress(request.config, f"docker build {IMAGE} FROM {BASE_IMAGE} (log: {log}; a few minutes cold)")
    started = time.monotonic()
    status = _stream(request.config, ["docker", "build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}",
                                      "-f", "docker/Dockerfile", "-t", IMAGE, "."], engine, log, SETUP_TIMEOUT,
                     re.compile(r"^(Step \d+/\d+ : (RUN|COPY|FROM)|Successfully installed|Successfully tagged)"))
    assert status == 0, f"docker build of {IMAGE} failed (status {status}); log {log}:\n{_tail(log)}"
    # Each rebuild after a code change leaves the previous image untagged; with the vfs storage
    # driver every layer is a full copy, so drop those (the current image's cache stays).
    subprocess.run(["docker", "image", "prune", "-f"], env=engine, capture_output=True, timeout=120)
    _progress(request.config, f"image built in {time.monotonic() - started:.0f}s")
    return IMAGE


def _stats(port: int) -> dict | None:
    """`npyloader stats --json` through the published port, or None while nothing answers."""
    proc = subprocess.run([sys.executable, "-m", "loader_server.cli", "stats", f"tcp://127.0.0.1:{port}",
                           "--json", "--timeout", "2"], capture_output=True, text=True, timeout=30)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


class Project:
    """One running compose project: its name, environment, ports and containers."""

    def __init__(self, name: str, env: dict[str, str], port: int, data: Path, log: Path, samples: int) -> None:
        self.name, self.env, self.port, self.data, self.log, self.samples = name, env, port, data, log, samples
        self.url = f"tcp://127.0.0.1:{port}"

    def compose(self, *args: str, timeout: float = 300) -> str:
        return _run([*_compose_argv(), "-p", self.name, *args], self.env, self.log, timeout,
                    f"{shlex.join(_compose_argv())} {shlex.join(args)}")

    def containers(self, service: str | None, *, all_states: bool = False) -> list[str]:
        """The ids of this project's containers of `service` (None: of every service, one-off
        `run` containers included)."""
        argv = ["docker", "ps", "-q", "--no-trunc", "--filter", f"label=com.docker.compose.project={self.name}"]
        if service is not None:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        out = subprocess.run(argv + (["-a"] if all_states else []), env=self.env, capture_output=True,
                             text=True, check=True, timeout=60).stdout
        return out.split()

    def docker(self, *args: str) -> str:
        return subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, check=True,
                              timeout=60).stdout

    def logs(self, tail: str = "60") -> str:
        proc = subprocess.run([*_compose_argv(), "-p", self.name, "logs", "--no-color", "--tail", tail],
                              cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        return out if tail == "all" else out[-6000:]


@contextlib.contextmanager
def _compose_project(request: pytest.FixtureRequest, engine: dict[str, str], image: str,
                     tmp_path_factory: pytest.TempPathFactory, *, loader_workers: int, up: list[str],
                     ready: Callable[[dict], bool], what: str) -> Iterator[Project]:
    """`docker-compose up -d UP...` from the repository root with the id dataset, until `ready` holds
    for `npyloader stats`; `down -v --remove-orphans` at the end, checking no container is left."""
    data = tmp_path_factory.mktemp("docker-data")
    samples = write_id_dataset(data / "ids", ROWS_PER_FILE)
    (data / "loader.toml").write_text(
        "[datasets.train]\n"
        'data = "ids/*.npy"\n'
        'layout = "combined"\n'
        "label_column = -1\n"
        f"batch_size = {BATCH_SIZE}\n"
        "seed = 0\n")
    # The containers run as uid 10001: the bind-mounted folder must be readable by others
    # (pytest makes its temporary folders 0700).
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    name = f"npyloadertest{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {**engine, "DATA_DIR": str(data), "LOADER_PORT": str(port), "WORKER_PORT": str(free_port()),
           "LOADER_WORKERS": str(loader_workers), "WORKER_ARGS": "--processes 1", "NPYLOADER_IMAGE": image}
    env.pop("LOADER_ARGS", None)  # the compose default, --config /data/loader.toml, is under test too
    log = tmp_path_factory.mktemp("docker-compose") / "compose.log"
    proj = Project(name, env, port, data, log, samples)
    try:
        _progress(request.config, f"compose project {name}: up -d {' '.join(up)} (log: {log})")
        started = time.monotonic()
        proj.compose("up", "-d", *up)
        try:
            wait_for(lambda: (s := _stats(port)) is not None and ready(s), 180, f"npyloader stats to show {what}",
                     interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\ncompose logs:\n{proj.logs()}") from None
        _progress(request.config, f"{what} in {time.monotonic() - started:.0f}s")
        yield proj
    finally:
        with open(log, "a") as f:  # the containers' own logs, for a post-mortem
            f.write(f"\n$ compose logs\n{proj.logs(tail='all')}\n")
        _progress(request.config, f"compose project {name}: down -v --remove-orphans")
        proj.compose("down", "-v", "--remove-orphans", "--timeout", "10")
        left = proj.containers(None, all_states=True)
        assert not left, f"containers of {name} left after down: {left}"


@pytest.fixture(scope="module")
def project(request: pytest.FixtureRequest, engine: dict[str, str], image: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """`docker-compose up -d --scale worker=2 loader worker` from the repository root, no local workers."""
    with _compose_project(request, engine, image, tmp_path_factory, loader_workers=0,
                          up=["--scale", "worker=2", "loader", "worker"],
                          ready=lambda s: s["workers"]["ready"] >= 2, what="loader and 2 workers ready") as proj:
        yield proj


@pytest.fixture(scope="module")
def shm_project(request: pytest.FixtureRequest, engine: dict[str, str], image: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """`docker-compose up -d loader` with a local worker (LOADER_WORKERS=1): only a loader with local
    workers has shared-memory slots to offer (`project`'s loader, with none, offers none)."""
    with _compose_project(request, engine, image, tmp_path_factory, loader_workers=1, up=["loader"],
                          ready=lambda s: s["workers"]["ready"] >= 1, what="loader with 1 local worker ready") as proj:
        yield proj


def _ids(batches: list[tuple[np.ndarray, ...]]) -> list[int]:
    return [int(v) for _, y in batches for v in y]


# -- the tests that need the engine ----------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_compose_epoch_from_worker_containers_exactly_once(project: Project) -> None:
    stats = _stats(project.port)
    assert stats is not None
    remote = [w for w in stats["workers"]["list"] if not w["local"]]
    assert len(remote) == 2 and len(stats["workers"]["list"]) == 2, stats["workers"]
    worker_hosts = {c[:12] for c in project.containers("worker")}
    assert {w["host"] for w in remote} == worker_hosts, "each worker container joined once"

    with BatchStream(project.url, dataset="train", epoch=0, timeout=60) as stream:
        assert len(stream) == 13
        got = [tuple(a.copy() for a in b) for b in stream]
    assert len(got) == 13 and [len(b[1]) for b in got] == [BATCH_SIZE] * 12 + [203 - 12 * BATCH_SIZE]
    assert sorted(_ids(got)) == list(range(project.samples)), "every sample id exactly once"
    for x, y in got:  # content too: write_id_dataset's features are a function of the id
        assert np.array_equal(x[:, 0], (y * 1000) % 9973)
    after = _stats(project.port)
    assert after is not None
    assert sum(w["batches"] for w in after["workers"]["list"] if not w["local"]) >= 13, "the workers built them"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_a_keras_model_on_the_host_trains_through_compose(project: Project) -> None:
    keras = pytest.importorskip("keras", reason="needs the keras extra: pip install -e '.[keras]'")
    from loader_client import RemoteSequence

    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    with RemoteSequence(project.url, dataset="train", timeout=60) as seq:
        history = model.fit(seq, epochs=2, verbose=0)
        stats = seq.stats()
    assert len(history.history["loss"]) == 2 and all(np.isfinite(history.history["loss"]))
    assert stats["batches"] >= 2 * 13, "both epochs came from the worker containers"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_killing_a_worker_container_mid_epoch_loses_no_batch(project: Project) -> None:
    """Epoch 1 with one worker container killed after the first batch: the other one finishes it.

    That worker is paused (frozen) before the epoch starts, so it is certainly holding batches
    when `docker kill` ends it: the server must notice it is gone and redo them elsewhere.
    """
    before = _stats(project.port)
    assert before is not None
    victim = project.containers("worker")[0]
    victim_host = victim[:12]
    project.docker("pause", victim)
    got: list[tuple[np.ndarray, ...]] = []
    try:
        with BatchStream(project.url, dataset="train", epoch=1, timeout=60) as stream:
            batches = iter(stream)
            got.append(tuple(a.copy() for a in next(batches)))
            stats = _stats(project.port)
            assert stats is not None
            # Frozen since before the epoch, the victim either still holds the batches it was
            # given or has already been dropped for silence (and its batches redone).
            held = [w["tasks"] for w in stats["workers"]["list"] if w["host"] == victim_host]
            project.docker("kill", victim)
            got.extend(tuple(a.copy() for a in b) for b in batches)
    finally:
        if victim in project.containers("worker"):  # still there (the test failed before the kill)
            subprocess.run(["docker", "unpause", victim], env=project.env, capture_output=True, timeout=60)
    assert len(got) == 13
    assert sorted(_ids(got)) == list(range(project.samples)), "every sample id exactly once after the kill"
    assert held == [] or held[0] > 0, f"the frozen worker held no batch: {stats['workers']}"
    after = _stats(project.port)
    assert after is not None
    assert after["workers"]["requeued_batches"] > before["workers"]["requeued_batches"], after["workers"]
    assert victim_host not in {w["host"] for w in after["workers"]["list"]}, "the killed worker is gone"

    # The survivor goes on serving: a third epoch, complete.
    with BatchStream(project.url, dataset="train", epoch=2, timeout=60) as stream:
        assert sorted(_ids([tuple(a.copy() for a in b) for b in stream])) == list(range(project.samples))


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_loader_container_turns_healthy_and_mounts_data_read_only(project: Project) -> None:
    loader = project.containers("loader")
    assert len(loader) == 1
    health = wait_for(
        lambda: (h := project.docker("inspect", "-f", "{{.State.Health.Status}}", loader[0]).strip()) == "healthy" and h,
        90, "the loader's HEALTHCHECK (npyloader stats) to report healthy", interval=1)
    assert health == "healthy"
    assert project.docker("inspect", "-f", "{{.Config.User}}", loader[0]).strip() not in ("", "0", "root")
    for cid in loader + project.containers("worker"):
        mounts = json.loads(project.docker("inspect", "-f", "{{json .Mounts}}", cid))
        data = [m for m in mounts if m["Destination"] == "/data"]
        assert data and data[0]["RW"] is False, f"{cid[:12]}: /data must be mounted read-only, got {mounts}"
        shm = project.docker("inspect", "-f", "{{.HostConfig.ShmSize}}", cid).strip()
        assert int(shm) >= 256 * 2**20, f"{cid[:12]}: /dev/shm is {shm} bytes"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 300)
def test_loader_stops_cleanly_and_worker_containers_rejoin_its_restart(project: Project) -> None:
    """`docker stop` (SIGTERM) ends the loader with status 0 and no traceback; started again, the
    worker containers rejoin it by themselves and the next epoch is complete."""
    loader = project.containers("loader")[0]
    workers = project.containers("worker")
    project.compose("stop", "--timeout", "20", "loader")
    try:
        exit_code = int(project.docker("inspect", "-f", "{{.State.ExitCode}}", loader).strip())
        logs = subprocess.run(["docker", "logs", loader], env=project.env, capture_output=True, text=True,
                              timeout=60)
        output = logs.stdout + logs.stderr
    finally:
        project.compose("start", "loader")
    wait_for(lambda: (s := _stats(project.port)) and s["workers"]["ready"] >= len(workers) and s, 90,
             f"the {len(workers)} worker container(s) to rejoin the restarted loader", interval=0.5)
    with BatchStream(project.url, dataset="train", epoch=0, timeout=60) as stream:
        assert sorted(_ids([tuple(a.copy() for a in b) for b in stream])) == list(range(project.samples))
    assert "Traceback" not in output and exit_code == 0, \
        f"the loader's shutdown on SIGTERM exited {exit_code}:\n{output[-3000:]}"


# -- trainer containers on the loader's host: shared memory, or the socket -----------------------

# What a trainer container runs in these tests: `python -c TRAINER_PROBE URL TRANSPORT`. It reads
# epoch 0 and prints one JSON line: each batch's sample ids and a digest of its bytes, whether its
# arrays are writable (a shared-memory batch is a read-only view of the loader's slot), the client's
# stats(), and, while it is still connected, what `npyloader stats` says about it: the clients that
# joined since the probe started (--json; a client of an earlier test that exited holding a slot
# stays listed until --client-timeout) and the human listing.
TRAINER_PROBE = """
import hashlib, json, os, subprocess, sys
from loader_client import BatchStream
url, transport = sys.argv[1], sys.argv[2]
def npyloader_stats(*flags):
    return subprocess.run(["npyloader", "stats", url, "--timeout", "10", *flags], capture_output=True, text=True,
                          check=True).stdout
before = {c["id"] for c in json.loads(npyloader_stats("--json"))["clients"]}
batches = []
with BatchStream(url, dataset="train", epoch=0, timeout=60, transport=transport) as stream:
    for x, y in stream:
        batches.append({"ids": [int(v) for v in y], "sha256": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest(),
                        "writeable": bool(x.flags.writeable or y.flags.writeable)})
    stats = stream.stats()
    joined = [c for c in json.loads(npyloader_stats("--json"))["clients"] if c["id"] not in before]
    listing = npyloader_stats()
print(json.dumps({"uid": os.getuid(), "batches": batches, "stats": stats, "joined": joined, "listing": listing}))
"""
TRAINER_TIMEOUT = 240


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def _host_epoch(project: Project) -> list[dict]:
    """Epoch 0 as a client on this host reads it over the published port: the reference bytes."""
    with BatchStream(project.url, dataset="train", epoch=0, timeout=60, transport="socket") as stream:
        out = []
        for x, y in stream:
            assert np.array_equal(x[:, 0], (y * 1000) % 9973), "write_id_dataset's features follow the id"
            out.append({"ids": [int(v) for v in y], "sha256": _digest(x, y)})
    return out


def _one_off(project: Project, argv: list[str], name: str, what: str) -> dict:
    """Run a client container in the foreground (`argv` names it `name`) and parse the JSON line it
    prints last. The container is removed afterwards whatever happened (a timeout included), and
    checked to be gone."""
    with open(project.log, "a") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=project.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=TRAINER_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} took more than {TRAINER_TIMEOUT}s; loader logs:\n{project.logs()}") from None
    finally:
        subprocess.run(["docker", "rm", "-f", name], env=project.env, capture_output=True, timeout=60)
    left = subprocess.run(["docker", "container", "inspect", name], env=project.env, capture_output=True, timeout=60)
    assert left.returncode != 0, f"the {what} container {name} is still there"
    with open(project.log, "a") as f:
        f.write(f"{proc.stdout}{proc.stderr}(exit {proc.returncode} after {time.monotonic() - started:.1f}s)\n")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"{what} printed no JSON line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def _compose_trainer(project: Project, *args: str, what: str) -> dict:
    """`docker-compose --profile trainer run --rm trainer ARGS`: the compose file's trainer service,
    in the loader's IPC namespace; ARGS (options, then `trainer` and its command) as given."""
    name = f"{project.name}-trainer-{uuid.uuid4().hex[:6]}"
    argv = [*_compose_argv(), "-p", project.name, "--profile", "trainer", "run", "--rm", "-T", "--name", name, *args]
    return _one_off(project, argv, name, what)


def _probe_from_compose(project: Project, *options: str, transport: str = "auto") -> dict:
    return _compose_trainer(project, *options, "trainer", TRAINER_PROBE, "tcp://loader:5555", transport,
                            what=f"the compose trainer {' '.join(options)} (transport={transport})")


def _check_epoch(got: dict, reference: list[dict], project: Project) -> None:
    """Epoch 0 read exactly once, and the same bytes, batch by batch, as the host read."""
    batches = got["batches"]
    assert [len(b["ids"]) for b in batches] == [BATCH_SIZE] * 12 + [project.samples - 12 * BATCH_SIZE]
    assert sorted(i for b in batches for i in b["ids"]) == list(range(project.samples)), "every sample once"
    assert [b["ids"] for b in batches] == [b["ids"] for b in reference], "the server's plan, in index order"
    assert [b["sha256"] for b in batches] == [b["sha256"] for b in reference], "the same bytes as over tcp"
    assert got["stats"]["batches"] == len(reference)


def _check_server_view(got: dict, transport: str) -> None:
    """`npyloader stats`, asked while the probe was connected: it was the one client that joined,
    with the transport it used, and the human listing shows that transport for it."""
    assert len(got["joined"]) == 1, got["joined"]
    me = got["joined"][0]
    assert me["transport"] == transport and me["batches"] == len(got["batches"]), me
    lines = [ln for ln in got["listing"].splitlines() if ln.split()[:3] == [me["id"][:12], "train", transport]]
    assert len(lines) == 1, f"client {me['id']} over {transport}, once, in:\n{got['listing']}"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 600)
def test_a_trainer_container_in_the_loaders_ipc_reads_the_epoch_from_shared_memory(shm_project: Project) -> None:
    """compose's trainer service (`ipc: "service:loader"`, uid 10001) maps the loader's slots."""
    loader = shm_project.containers("loader")
    assert len(loader) == 1
    assert shm_project.docker("inspect", "-f", "{{.HostConfig.IpcMode}}", loader[0]).strip() == "shareable"
    reference = _host_epoch(shm_project)

    # The example as the compose file has it.
    example = _compose_trainer(shm_project, "trainer", what="the compose trainer example")
    assert example["stats"]["transport"] == "shm" and example["stats"]["transport_reason"] is None, example
    assert example["samples"] == shm_project.samples and example["stats"]["batches"] == len(reference), example

    # The same service, strict (transport="shm" raises rather than fall back), reporting every batch.
    got = _probe_from_compose(shm_project, transport="shm")
    assert got["uid"] == 10001
    assert got["stats"]["transport"] == "shm" and got["stats"]["transport_reason"] is None, got["stats"]
    assert got["stats"]["copied"] == 0, got["stats"]
    _check_epoch(got, reference, shm_project)
    assert not any(b["writeable"] for b in got["batches"]), "views of the read-only mapping of the slots"
    _check_server_view(got, "shm")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 600)
def test_a_trainer_container_without_the_loaders_ipc_reads_the_same_epoch_over_the_socket(
        shm_project: Project) -> None:
    """A container on the project network but in its own IPC namespace (its own /dev/shm) falls back
    to tcp, says why, and receives the same bytes."""
    reference = _host_epoch(shm_project)
    loader = shm_project.containers("loader")[0]
    networks = json.loads(shm_project.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", loader))
    assert len(networks) == 1, networks
    name = f"{shm_project.name}-alone-{uuid.uuid4().hex[:6]}"
    argv = ["docker", "run", "--rm", "--name", name, "--network", next(iter(networks)), "--user", "10001:10001",
            "--entrypoint", "python", shm_project.env["NPYLOADER_IMAGE"],
            "-c", TRAINER_PROBE, "tcp://loader:5555", "auto"]
    got = _one_off(shm_project, argv, name, "a trainer container without the loader's IPC")
    assert got["uid"] == 10001
    stats = got["stats"]
    assert stats["transport"] == "socket", stats
    reason = stats["transport_reason"] or ""
    assert re.match(r"/dev/shm/npyloader-\d+-train is not visible here", reason), reason
    _check_epoch(got, reference, shm_project)
    _check_server_view(got, "socket")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(SETUP_TIMEOUT + 600)
def test_a_trainer_of_another_uid_in_the_loaders_ipc_falls_back_to_the_socket(shm_project: Project) -> None:
    """Same IPC namespace and /dev/shm, another uid: the segment (mode 0600) is not readable."""
    reference = _host_epoch(shm_project)
    got = _probe_from_compose(shm_project, "--user", "10002:10002")
    assert got["uid"] == 10002
    stats = got["stats"]
    assert stats["transport"] == "socket", stats
    reason = stats["transport_reason"] or ""
    assert re.match(r"/dev/shm/npyloader-\d+-train is not readable by this user \(uid 10002\)", reason), reason
    _check_epoch(got, reference, shm_project)
    _check_server_view(got, "socket")


# -- the compose files, without an engine ----------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR:-default}, ${VAR-default}, ${VAR}, $VAR, $$."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        default = m.group(2) or ""
        return env.get(name) or default
    return _VAR.sub(sub, text)


def _load_with_pyyaml(path: Path, env: dict[str, str]) -> dict:
    """The file as `compose config` sees it: variables substituted, relative host paths made absolute."""
    import yaml

    config = yaml.safe_load(_interpolate(path.read_text(), env))
    base = path.parent
    for svc in config["services"].values():
        build = svc.get("build")
        if isinstance(build, dict) and "context" in build:
            build["context"] = str((base / build["context"]).resolve())
        volumes = []
        for v in svc.get("volumes", []):
            if isinstance(v, str) and v.startswith("."):
                source, rest = v.split(":", 1)
                v = f"{(base / source).resolve()}:{rest}"
            volumes.append(v)
        if volumes:
            svc["volumes"] = volumes
    return config


def _compose_config_python() -> str | None:
    """docker-compose (v1) is a Python program with PyYAML: its interpreter turns `config` into JSON."""
    exe = shutil.which("docker-compose")
    if exe is None:
        return None
    with open(exe, "rb") as f:
        first = f.readline().decode(errors="replace")
    if not first.startswith("#!"):
        return None
    python = first[2:].strip().split()[0]
    ok = subprocess.run([python, "-c", "import yaml"], capture_output=True, timeout=30).returncode == 0
    return python if ok else None


def _load_with_compose_config(path: Path, env: dict[str, str], python: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".env") as no_env:  # no .env of a developer's
        config = subprocess.run(["docker-compose", "--env-file", no_env.name, "-f", str(path), "config"], env=env,
                                capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, f"docker-compose config {path} failed:\n{config.stderr}"
    as_json = subprocess.run([python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                             input=config.stdout, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(as_json.stdout)


def _is_read_only_data(volume: object) -> bool:
    if isinstance(volume, str):
        parts = volume.split(":")
        return len(parts) >= 3 and parts[1] == "/data" and "ro" in parts[2].split(",")
    return isinstance(volume, dict) and volume.get("target") == "/data" and volume.get("read_only") is True


def _healthcheck_disabled(svc: dict) -> bool:
    hc = svc.get("healthcheck") or {}
    return hc.get("disable") is True or hc.get("test") in (["NONE"], "NONE")


def _compose_loader() -> Callable[[Path, dict[str, str]], dict]:
    """load(path, env): a compose file as `compose config` reads it with that environment, through
    PyYAML if installed, else through `docker-compose config`; else the test is skipped."""
    try:
        import yaml  # noqa: F401
    except ImportError:
        python = _compose_config_python()
        if python is None:
            pytest.skip("neither PyYAML (pip install pyyaml) nor docker-compose (tools/local-docker.sh up) is installed")
        return lambda path, env: _load_with_compose_config(path, env, python)
    return _load_with_pyyaml


def test_compose_files_agree_and_keep_the_deployment_rules() -> None:
    clean_env = {k: v for k, v in os.environ.items()
                 if k not in {"DATA_DIR", "LOADER_ARGS", "LOADER_PORT", "WORKER_PORT", "LOADER_WORKERS",
                              "WORKER_ARGS", "NPYLOADER_IMAGE", "NPYLOADER_BASE", "COMPOSE_FILE",
                              "COMPOSE_PROJECT_NAME", "PROMETHEUS_IMAGE", "GRAFANA_IMAGE", "PROMETHEUS_PORT",
                              "GRAFANA_PORT"}}
    clean_env["DOCKER_HOST"] = DOCKER_HOST  # `docker-compose config` needs no engine, only a valid value
    compose_load = _compose_loader()

    def load(path: Path, **env: str) -> dict:
        return compose_load(path, {**clean_env, **env})

    configs = {name: load(path) for name, path in COMPOSE_FILES.items()}
    assert configs["root"] == configs["docker"], "compose.yaml and docker/compose.yaml differ beyond their paths"
    services = configs["root"]["services"]
    assert {"loader", "worker"} <= set(services)
    loader, worker = services["loader"], services["worker"]

    assert not worker.get("ports"), "worker replicas must not publish host ports (--scale worker=N)"
    assert "container_name" not in worker and "container_name" not in loader
    for name, svc in (("loader", loader), ("worker", worker)):
        assert any(_is_read_only_data(v) for v in svc.get("volumes", [])), f"{name}: /data read-only"
        assert str(ROOT / "data") in str(svc["volumes"]), f"{name}: DATA_DIR defaults to the repository's data/"
        assert svc.get("shm_size"), f"{name}: shm_size"
        assert svc["image"] == "npyloader:local"
    assert str(loader["shm_size"]).lower() in ("1gb", "1g", str(2**30))
    assert _healthcheck_disabled(worker), "the image's broker healthcheck makes no sense in a worker"
    assert "npyloader" in loader["healthcheck"]["test"] and "stats" in loader["healthcheck"]["test"]
    assert loader["build"]["context"] == str(ROOT)
    assert loader["build"]["dockerfile"] == "docker/Dockerfile"
    assert loader["build"]["args"]["BASE"] == "python:3.11-slim"

    command = loader["command"] if isinstance(loader["command"], list) else shlex.split(loader["command"])
    assert command == ["serve", "--config", "/data/loader.toml", "--bind", "tcp://0.0.0.0:5555",
                       "--worker-bind", "tcp://0.0.0.0:5556", "--workers", "1", "--metrics-port", "9100"]
    wcommand = worker["command"] if isinstance(worker["command"], list) else shlex.split(worker["command"])
    assert wcommand == ["worker", "--connect", "tcp://loader:5556", "--metrics-port", "9101"]
    published = {str(p.get("published")) if isinstance(p, dict) else p.split(":")[0] for p in loader["ports"]}
    assert published == {"5555", "5556"}

    # The trainer example: only under its profile (so `docker compose up [loader]` starts what it
    # did before), in the loader's IPC namespace and /dev/shm, as the loader's uid.
    assert {n for n, s in services.items() if not s.get("profiles")} == {"loader", "worker"}
    trainer = services["trainer"]
    assert trainer["profiles"] == ["trainer"]
    assert loader.get("ipc") == "shareable", "the loader's IPC namespace must be joinable"
    assert trainer.get("ipc") == "service:loader"
    assert "shm_size" not in trainer, "its /dev/shm is the loader's"
    assert "loader" in trainer["depends_on"]
    image_uid = re.search(r"^USER (\d+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert str(trainer["user"]).split(":")[0] == image_uid, "segments are mode 0600: only the loader's uid maps them"
    assert trainer["image"] == loader["image"] and not trainer.get("ports")
    assert _healthcheck_disabled(trainer), "the image's broker healthcheck makes no sense in a trainer"
    assert trainer["entrypoint"] == ["python", "-c"]
    script = trainer["command"] if isinstance(trainer["command"], list) else [trainer["command"]]
    assert len(script) == 1, "one word: the script for python -c"
    compile(script[0], "compose trainer", "exec")
    assert "BatchStream(\"tcp://loader:5555\"" in script[0] and "stream.stats()" in script[0]

    for name, path in COMPOSE_FILES.items():
        text = path.read_text()
        for default in ("${LOADER_PORT:-5555}", "${WORKER_PORT:-5556}", "${LOADER_WORKERS:-1}",
                        "${LOADER_ARGS:---config /data/loader.toml}", "${NPYLOADER_IMAGE:-npyloader:local}",
                        "${NPYLOADER_BASE:-python:3.11-slim}", "${WORKER_ARGS:-}"):
            assert default in text, f"{path.relative_to(ROOT)} lacks the default {default}"
        assert re.search(r"\$\{DATA_DIR:-\.{1,2}/data\}:/data:ro", text), f"{path.relative_to(ROOT)}: DATA_DIR default"

    # Several flags in LOADER_ARGS become several words (compose splits a string command like a
    # shell, without one), and quotes keep a glob for npyloader to expand.
    custom = load(COMPOSE_FILES["root"], LOADER_ARGS="--data '/data/train/*.npy' --label-column -1 --batch-size 64",
                  WORKER_ARGS="--processes 2")
    command = custom["services"]["loader"]["command"]
    assert (command if isinstance(command, list) else shlex.split(command))[:7] == [
        "serve", "--data", "/data/train/*.npy", "--label-column", "-1", "--batch-size", "64"]
    wcommand = custom["services"]["worker"]["command"]
    assert (wcommand if isinstance(wcommand, list) else shlex.split(wcommand))[-2:] == ["--processes", "2"]

    # docker/.env.example: every variable the compose files use, each with its default and a comment.
    used = set()
    for path in COMPOSE_FILES.values():
        used |= {m.group(1) for m in re.finditer(r"\$\{(\w+)", path.read_text())}
    lines = ENV_EXAMPLE.read_text().splitlines()
    listed = {}
    for i, line in enumerate(lines):
        m = re.match(r"#?(\w+)=(.*)$", line)
        if m:
            listed[m.group(1)] = m.group(2)
            assert i > 0 and lines[i - 1].startswith("# "), f".env.example: {m.group(1)} needs a comment line above"
    assert used <= set(listed), f"docker/.env.example lacks {sorted(used - set(listed))}"
    assert listed["LOADER_ARGS"] == "--config /data/loader.toml" and listed["LOADER_PORT"] == "5555"
    assert listed["NPYLOADER_IMAGE"] == "npyloader:local" and listed["DATA_DIR"] == "./data"


def test_dockerfile_and_dockerignore_keep_the_image_small_and_unprivileged() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "ARG BASE=python:3.11-slim" and lines[1] == "FROM ${BASE}"
    assert 'ENTRYPOINT ["npyloader"]' in lines
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M), "numeric non-root USER (k8s runAsNonRoot checks it)"
    assert re.search(r'HEALTHCHECK .*\n?.*"npyloader", "stats", "tcp://127.0.0.1:5555", "--timeout", "3"', dockerfile)
    code = "\n".join(lines)
    assert "tensorflow" not in code.lower() and "keras" not in code.lower(), "server extras only"
    assert "python3 -m venv /opt/venv" in code and "ENV PATH=/opt/venv/bin:" in code
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "demo-data", "**/__pycache__", ".pytest_cache", ".hypothesis", "docs"} <= ignored
    script = SCRIPT.read_text()
    assert script.startswith("#!/usr/bin/env bash\n#") and "set -euo pipefail" in script
    assert "docker pull" not in script
