"""Every mistake a user can make on the command line ends as one clear line on stderr, naming
the culprit (file, glob, option or endpoint), with exit status 2 and no traceback.

These run `npyloader serve` as a plain subprocess, since each must fail before it is ready.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from loader_client import EndpointError
from loader_client.stream import BatchStream
from tests.helpers import (
    as_user_command,
    free_port,
    run_bounded,
    serve_command,
    write_id_dataset,
)

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`npyloader ARGS`; `serve` starts workers, so a hang stops its whole process group."""
    return run_bounded(serve_command(*args), timeout=timeout, cwd=REPO)


def serve(*args: str) -> subprocess.CompletedProcess:
    """`npyloader serve ARGS` with one worker, on a free port unless ARGS bind one."""
    extra = ["--workers", "1"] + ([] if "--bind" in args else ["--bind", "tcp://127.0.0.1:0"])
    return run("serve", *args, *extra)


def assert_user_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, one `error:` line naming each of `names`, no traceback. Returns that line."""
    err = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A folder of two consistent combined-layout files (17 columns: 16 features + a label)."""
    folder = tmp_path / "good"
    write_id_dataset(folder, [20, 12])
    return folder


# ---------------------------------------------------------------------------------------------
# Data files


def test_glob_matching_no_files(tmp_path):
    pattern = str(tmp_path / "nowhere" / "*.npy")
    line = assert_user_error(serve("--data", pattern), pattern)
    assert "--data" in line


def test_file_with_a_different_dtype(good):
    odd = good / "part-999.npy"
    np.save(odd, np.zeros((4, 17), np.float64))
    line = assert_user_error(serve("--data", str(good / "*.npy"), "--label-column", "-1"), str(odd))
    assert str(good / "part-000.npy") in line
    assert "float64" in line and "float32" in line


def test_file_with_a_different_row_shape(good):
    odd = good / "part-999.npy"
    np.save(odd, np.zeros((4, 18), np.float32))
    line = assert_user_error(serve("--data", str(good / "*.npy")), str(odd))
    assert "shape" in line


def test_corrupt_header(good):
    bad = good / "x.npy"
    bad.write_bytes(b"not a numpy file")
    assert_user_error(serve("--data", str(good / "*.npy")), str(bad))


def test_object_dtype(good):
    bad = good / "objects.npy"
    np.save(bad, np.array([{}, 1], dtype=object), allow_pickle=True)
    line = assert_user_error(serve("--data", str(good / "*.npy")), str(bad))
    assert "object" in line


def test_paired_row_counts_differ(tmp_path):
    inputs, targets = tmp_path / "in", tmp_path / "tg"
    inputs.mkdir()
    targets.mkdir()
    np.save(inputs / "s.npy", np.zeros((5, 4, 4), np.float32))
    np.save(targets / "s.npy", np.zeros((6, 4, 4), np.uint8))
    line = assert_user_error(
        serve("--data", str(inputs / "*.npy"), "--layout", "paired", "--targets", str(targets / "*.npy")),
        str(inputs / "s.npy"), str(targets / "s.npy"))
    assert "5" in line and "6" in line


# ---------------------------------------------------------------------------------------------
# Data the server's user may not read (compose: the image runs as uid 10001, the host folder is 0700)

NOBODY = 65534
NAMELESS = 10001  # no entry in /etc/passwd, like the image's user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")


@pytest.fixture
def shared_dir() -> Path:
    """A folder in the system temp dir that every user may enter (pytest's tmp_path sits in a
    0700 folder of root's): `open/` readable by all, `private/` mode 0700 owned by root."""
    top = Path(tempfile.mkdtemp(prefix="npyloader-perms-"))
    try:
        top.chmod(0o755)
        write_id_dataset(top / "open", [8])
        write_id_dataset(top / "private", [8])
        np.save(top / "private" / "labels.npy", np.zeros(1, np.int64))
        (top / "open").chmod(0o755)
        (top / "private").chmod(0o700)
        yield top
    finally:
        shutil.rmtree(top)


def serve_as(uid: int, *args: str) -> subprocess.CompletedProcess:
    """`npyloader serve ARGS` as user `uid`, failing before it is ready (no workers to start)."""
    return run_bounded(as_user_command(uid, "serve", *args, "--workers", "0", "--worker-bind", "tcp://127.0.0.1:0",
                                       "--bind", "tcp://127.0.0.1:0", "--no-index-cache"), timeout=60, cwd=REPO)


@needs_root
@pytest.mark.parametrize("uid, user", [(NOBODY, "nobody (uid 65534)"), (NAMELESS, "by uid 10001,")])
def test_a_glob_in_a_folder_the_user_cannot_list_names_the_folder_and_the_user(shared_dir, uid, user):
    private = shared_dir / "private"
    pattern = str(private / "*.npy")
    line = assert_user_error(serve_as(uid, "--data", pattern), "--data", pattern, user)
    assert f"the folder {private} cannot be listed" in line and "mode is 0700" in line
    assert f"chmod o+rx {private}" in line and "run npyloader as a user who can read it" in line
    assert "quote the glob" not in line, "not the advice for a glob that matches nothing"


@needs_root
@pytest.mark.parametrize("spelling", ["folder", "glob below it"])
def test_a_folder_the_user_cannot_list_or_enter_is_named(shared_dir, spelling):
    private = shared_dir / "private"
    data = str(private) if spelling == "folder" else str(private / "deeper" / "*.npy")
    line = assert_user_error(serve_as(NOBODY, "--data", data), "--data", str(private), "nobody (uid 65534)")
    assert "cannot be listed" in line if spelling == "folder" else f"chmod o+x {private}" in line


@needs_root
def test_unreadable_targets_and_labels_are_named_like_data(shared_dir):
    private, public = shared_dir / "private", shared_dir / "open"
    targets = str(private / "*.npy")
    line = assert_user_error(serve_as(NOBODY, "--data", str(public), "--layout", "paired", "--targets", targets),
                             "--targets", targets, "nobody (uid 65534)")
    assert f"the folder {private} cannot be listed" in line
    labels = str(private / "labels.npy")
    line = assert_user_error(serve_as(NOBODY, "--data", str(public / "part-000.npy"), "--layout", "per-sample",
                                      "--labels", labels), labels, "nobody (uid 65534)")
    assert f"the folder {private} cannot be entered" in line


@needs_root
def test_a_file_the_user_cannot_read_is_named_with_its_mode(shared_dir):
    secret = shared_dir / "open" / "part-999.npy"
    np.save(secret, np.zeros((2, 17), np.float32))
    secret.chmod(0o600)
    assert_user_error(serve_as(NOBODY, "--data", str(shared_dir / "open" / "*.npy")), str(secret),
                      "nobody (uid 65534)", "mode is 0600", f"chmod o+r {secret}")


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("spec, named", [("spin:p=1", "spin"), ("rotate:degres=3", "degres")])
def test_bad_augment(good, spec, named):
    line = assert_user_error(
        serve("--data", str(good / "*.npy"), "--label-column", "-1", "--x-shape", "4,4", "--augment", spec),
        "--augment", spec, named)
    if named == "degres":
        assert "degrees" in line  # the known parameters are listed


def test_label_column_out_of_range(good):
    assert_user_error(serve("--data", str(good / "*.npy"), "--label-column", "99"), "--label-column", "99")


def test_x_shape_that_does_not_match_the_row_size(good):
    line = assert_user_error(serve("--data", str(good / "*.npy"), "--label-column", "-1", "--x-shape", "5,5"),
                             "--x-shape")
    assert "25" in line and "16" in line


def test_endpoint_in_use(good):
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind("tcp://127.0.0.1:*")
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        line = assert_user_error(serve("--data", str(good / "*.npy"), "--bind", endpoint), endpoint, "in use")
        assert "--bind" in line
    finally:
        sock.close(0)


@pytest.mark.parametrize("where", ["serve flag", "server table", "worker flag"])
def test_task_timeout_that_is_not_positive(good, tmp_path, where):
    if where == "serve flag":
        result = serve("--data", str(good), "--label-column", "-1", "--task-timeout", "0")
    elif where == "server table":
        cfg = tmp_path / "loader.toml"
        cfg.write_text(f'[server]\ntask_timeout = -5\n\n[datasets.train]\ndata = "{good}/*.npy"\n')
        result = serve("--config", str(cfg))
    else:
        result = run("worker", "--connect", f"tcp://127.0.0.1:{free_port()}", "--task-timeout", "0")
    assert_user_error(result, "--task-timeout", "positive")


@pytest.mark.parametrize("option, endpoint, says", [
    ("--bind", "tcp://127.0.0.1:99999", "port 99999 is out of range"),  # libzmq alone would listen on 34463
    ("--bind", "tcp://127.0.0.1:http", "'http' is not a number"),
    ("--bind", "udp://127.0.0.1:5555", "scheme 'udp://' is not supported"),
    ("--worker-bind", "tcp://:5556", "the host is empty"),
    ("--worker-bind", "tcp://::1:5556", "tcp://[::1]:PORT"),
    ("--bind", "ipc://" + "/x" * 60, "more than the"),
])
def test_malformed_bind_endpoints(good, option, endpoint, says):
    line = assert_user_error(serve("--data", str(good / "*.npy"), option, endpoint), option, endpoint, says)
    if option == "--bind":
        assert "--worker-bind" not in line


@pytest.mark.parametrize("args, named, says", [
    (("worker", "--connect", "tcp://127.0.0.1:0"), "--connect", "only means 'any free port'"),
    (("worker", "--connect", "tcp://loader"), "--connect", "there is no port"),
    (("worker", "--connect", "tcp://loader:5556", "--metrics-port", "70000"), "--metrics-port", "out of range"),
    (("stats", "tcp://127.0.0.1:99999"), "endpoint", "port 99999 is out of range"),
    (("stats", "127.0.0.1:5555", "--watch"), "endpoint", "there is no scheme"),
])
def test_malformed_connect_endpoints(args, named, says):
    assert_user_error(run(*args, timeout=30), named, says)


def test_batch_stream_refuses_a_malformed_url_at_once():
    with pytest.raises(EndpointError, match=r"^url 'tcp://127\.0\.0\.1:99999': port 99999 is out of range"):
        BatchStream("tcp://127.0.0.1:99999", timeout=30)


def test_config_file_missing(tmp_path):
    missing = tmp_path / "missing.toml"
    assert_user_error(serve("--config", str(missing)), "--config", str(missing))


def test_config_with_unknown_key(tmp_path, good):
    cfg = tmp_path / "loader.toml"
    cfg.write_text(f'[datasets.train]\ndata = "{good}/*.npy"\nbatch_sise = 8\n')
    assert_user_error(serve("--config", str(cfg)), str(cfg), "batch_sise")


# ---------------------------------------------------------------------------------------------
# Nobody there


def test_stats_of_a_server_that_is_not_there():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run("stats", endpoint, "--timeout", "1", timeout=30)
    elapsed = time.monotonic() - started
    assert_user_error(result, endpoint)
    assert elapsed < 15, f"stats took {elapsed:.1f}s to give up"  # bounds a hang (includes startup)


def test_batch_stream_to_a_server_that_is_not_there():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        BatchStream(endpoint, timeout=1.0)
    elapsed = time.monotonic() - started
    assert endpoint in str(info.value)
    assert elapsed < 5, f"BatchStream took {elapsed:.1f}s to give up"


def test_batch_stream_for_an_unknown_dataset(start_server, id_dataset):
    folder, _ = id_dataset
    server = start_server("--data", str(folder / "*.npy"), "--label-column", "-1", "--batch-size", "16", workers=1)
    with pytest.raises(Exception) as info:
        BatchStream(server.endpoint, dataset="nope", timeout=10)
    assert not isinstance(info.value, TimeoutError), info.value
    assert "nope" in str(info.value) and "train" in str(info.value)
    # the server is fine afterwards
    with BatchStream(server.endpoint, timeout=20) as stream:
        assert len(stream) == 13


# ---------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("args", [(), ("serve",), ("stats",), ("demo-data",)], ids=lambda a: " ".join(a) or "top")
def test_help(args):
    result = run(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "Traceback" not in result.stderr
