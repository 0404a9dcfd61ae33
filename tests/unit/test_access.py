"""Which folder stops a data path: the walk from / to the path or glob, with permissions faked
(as root every os.access succeeds; tests/live/test_user_errors.py runs the real thing as another user)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loader_server.data import access


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.npy").write_bytes(b"")
    return tmp_path


def deny(monkeypatch: pytest.MonkeyPatch, folder: Path, mode: int) -> None:
    """This user lacks `mode` (os.R_OK, os.X_OK) on `folder` alone."""
    real = os.access
    monkeypatch.setattr(access.os, "access", lambda p, m: not (str(p) == str(folder) and m & mode) and real(p, m))


def test_an_open_way_or_a_missing_path_is_not_a_permission_problem(tree):
    for pattern in ("a/b/*.npy", "a/b", "a/b/x.npy", "a/missing/*.npy", "a/b/x.npy/deeper"):
        assert access.blocked_folder(str(tree / pattern)) is None, pattern


@pytest.mark.parametrize("pattern, denied, mode, found", [
    ("a/b/*.npy", "a/b", os.R_OK, ("a/b", "list")),         # a glob lists its folder
    ("a/b/**/*.npy", "a/b", os.R_OK, ("a/b", "list")),
    ("a/b", "a/b", os.R_OK, ("a/b", "list")),               # so does a folder given as such
    ("a/b/*.npy", "a/b", os.X_OK, ("a/b", "list")),         # listing needs both r and x
    ("a/b/*.npy", "a", os.X_OK, ("a", "enter")),            # a folder on the way is only entered
    ("a/b/x.npy", "a/b", os.X_OK, ("a/b", "enter")),
    ("a/b/x.npy", "a/b", os.R_OK, None),                    # a named file needs no listing
    ("a/b/*.npy", "a", os.R_OK, None),
])
def test_the_first_folder_that_stops_the_way_is_named(tree, monkeypatch, pattern, denied, mode, found):
    deny(monkeypatch, tree / denied, mode)
    expected = None if found is None else (str(tree / found[0]), found[1])
    assert access.blocked_folder(str(tree / pattern)) == expected


def test_the_message_names_the_folder_mode_owner_user_and_fix(tree, monkeypatch):
    folder = tree / "a" / "b"
    folder.chmod(0o750)
    deny(monkeypatch, folder, os.R_OK)
    text = access.folder_problem(str(folder / "*.npy"))
    assert text.startswith(f"the folder {folder} cannot be listed by {access.running_as()}, the user npyloader runs as")
    assert "its mode is 0750" in text and f"chmod o+rx {folder}" in text and "compose: user:" in text
    assert access.folder_problem(str(tree / "a" / "*.npy")) is None


def test_a_user_without_a_name_is_shown_by_uid(monkeypatch):
    def no_entry(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.setattr(access.os, "geteuid", lambda: 10001)
    monkeypatch.setattr(access.pwd, "getpwuid", no_entry)
    assert access.running_as() == "uid 10001"
