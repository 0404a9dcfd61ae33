"""`npyloader --version`: the version written once, in loader_server.__version__."""

from __future__ import annotations

import re

import pytest

import loader_server
from loader_server.cli import main


def test_version_flag_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"npyloader {loader_server.__version__}\n"


def test_the_version_is_a_release_number_pip_accepts():
    # PEP 440's public release form, which setuptools copies into the wheel's name and metadata
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", loader_server.__version__)
