"""The package as a user gets it: built into an sdist and a wheel, installed with no extras.

Everything here runs the installed copy, never this checkout: the venv's own interpreter and
`npyloader` script, with PYTHONPATH cleared and a working directory outside the repository, so
a module missing from the wheel or a dependency missing from pyproject.toml fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import loader_server
from tests.helpers import ServerProcess, launch, run_bounded, write_id_dataset

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("loader_server", "loader_client")

# Reads one whole epoch through the installed client and checks every sample came exactly once
# with its own pixels (write_id_dataset's features are a function of the sample id).
READER = textwrap.dedent("""
    import sys
    import numpy as np
    import loader_client
    from loader_client import BatchStream
    url, n, features = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ids = []
    with BatchStream(url, dataset="train", epoch=0, timeout=60) as stream:
        for x, y in stream:
            rows = y.astype(int)
            expected = (rows[:, None] * 1000 + np.arange(features)[None, :]) % 9973
            assert np.array_equal(x.reshape(len(rows), features), expected), "a row's features are not its sample's"
            ids += rows.tolist()
    print("client", loader_client.__file__)
    print("ids-ok" if sorted(ids) == list(range(n)) else f"ids-wrong {len(ids)} {len(set(ids))}")
""")

# `import loader_client` must work without Keras; RemoteSequence must then say what to install.
WITHOUT_KERAS = textwrap.dedent("""
    import importlib.util
    import loader_client
    from loader_client import BatchStream, request_stats
    print("keras", importlib.util.find_spec("keras"), "tensorflow", importlib.util.find_spec("tensorflow"))
    try:
        loader_client.RemoteSequence
    except ImportError as e:
        print("error", e)
""")


def _isolated_env() -> dict[str, str]:
    """The environment with this checkout out of reach: no PYTHONPATH (pytest runs with the
    worktree on it), no venv of ours active."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _source_modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`python -m build`: the sdist, then the wheel built from that sdist (so the wheel proves
    the sdist holds everything needed to build it)."""
    out = tmp_path_factory.mktemp("dist")
    result = run_bounded([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = out.glob("npyloader-*.tar.gz")
    (wheel,) = out.glob("npyloader-*-py3-none-any.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and no extras: only the dependencies it declares."""
    folder = tmp_path_factory.mktemp("venv") / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True, timeout=120)
    if made.returncode != 0 and "ensurepip" in made.stdout + made.stderr:
        pytest.skip(f"python -m venv cannot make a venv with pip here (no ensurepip): {made.stderr.strip()[-300:]}")
    assert made.returncode == 0, made.stdout + made.stderr
    installed = run_bounded([str(folder / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off",
                             str(dist[1])], timeout=600, env=_isolated_env(), cwd=folder)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_sdist_holds_the_sources_readme_and_license_and_no_local_clutter(dist):
    sdist, _ = dist
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= names
    assert _source_modules() <= names
    clutter = {n for n in names if n.split("/")[0] in ("tests", "docs", "docker", ".venv", "demo-data", "build")
               or "__pycache__" in n or n.endswith(".pyc")}
    assert not clutter, sorted(clutter)


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_license_and_passes_twine_check(dist):
    sdist, wheel = dist
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"npyloader-{loader_server.__version__}.dist-info/METADATA").decode()
    assert _source_modules() <= names, sorted(_source_modules() - names)
    assert f"npyloader-{loader_server.__version__}.dist-info/licenses/LICENSE" in names
    assert {n.split("/")[0] for n in names} == {*PACKAGES, f"npyloader-{loader_server.__version__}.dist-info"}
    assert "Description-Content-Type: text/markdown" in metadata and "License-Expression: Apache-2.0" in metadata
    checked = run_bounded([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)], timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.slow
def test_installed_wheel_reports_its_version(venv, dist):
    result = run_bounded([str(venv / "bin" / "npyloader"), "--version"], timeout=60, env=_isolated_env(), cwd=venv)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"npyloader {loader_server.__version__}\n"
    assert dist[1].name.startswith(f"npyloader-{loader_server.__version__}-")


@pytest.mark.slow
def test_installed_client_imports_without_keras_and_says_what_to_install_for_remote_sequence(venv):
    result = run_bounded([str(venv / "bin" / "python"), "-c", WITHOUT_KERAS], timeout=120, env=_isolated_env(),
                         cwd=venv)
    assert result.returncode == 0, result.stderr
    assert "keras None tensorflow None" in result.stdout, "the venv was meant to have no Keras or TensorFlow"
    error = re.search(r"^error (.*)$", result.stdout, re.MULTILINE)
    assert error, f"RemoteSequence without Keras raised nothing:\n{result.stdout}"
    assert "pip install 'npyloader[keras]'" in error.group(1) and str(venv / "bin" / "python") in error.group(1)


@pytest.mark.slow
def test_installed_server_serves_an_epoch_exactly_once_to_the_installed_client(venv, tmp_path):
    features = 16
    n = write_id_dataset(tmp_path / "ids", [40, 30, 25], features=features)
    env = {"PYTHONPATH": ""}  # an empty PYTHONPATH is no PYTHONPATH: the checkout stays out of reach
    server = ServerProcess(launch([str(venv / "bin" / "npyloader"), "serve", "--data", str(tmp_path / "ids"),
                                   "--label-column", "-1", "--batch-size", "16", "--workers", "1",
                                   "--bind", "tcp://127.0.0.1:0"], tmp_path / "server.log", env=env),
                           tmp_path / "server.log")
    try:
        server.wait_ready()
        result = run_bounded([str(venv / "bin" / "python"), "-c", READER, server.endpoint, str(n), str(features)],
                             timeout=120, env=_isolated_env(), cwd=tmp_path)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr + server.log()[-3000:]
    assert "ids-ok" in result.stdout, result.stdout
    client_file = re.search(r"^client (.*)$", result.stdout, re.MULTILINE).group(1)
    assert Path(client_file).is_relative_to(venv), f"the client came from {client_file}, not the venv"
