"""Why this process cannot read a data path: which folder or file stops it, and as which user.

A glob inside a folder that the server's user cannot list matches nothing, and "matches no
files" sends the user looking for a typo. That is what a container shows when its user (the
image runs as uid 10001) meets a host folder of mode 0700. So a path that finds nothing or
cannot be opened is checked here: the first folder on its way this user may not enter or
list (or the file itself) is named, with its mode and owner, the user npyloader runs as, and
what to change.
"""

from __future__ import annotations

import glob
import os
import pwd
import stat
from pathlib import Path

RUN_AS_ANOTHER = "or run npyloader as a user who can read it (Docker: --user, compose: user:)"


def running_as() -> str:
    """'nobody (uid 65534)', or 'uid 10001' where the user has no name (common in containers)."""
    return _user(os.geteuid())


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _describe(path: str) -> str:
    st = os.stat(path)
    return f"its mode is {stat.S_IMODE(st.st_mode):04o}, its owner {_user(st.st_uid)}"


def blocked_folder(pattern: str) -> tuple[str, str] | None:
    """The first folder on the way to `pattern` (a file, a folder or a glob) that this user may
    not enter, or not list where it must be listed: (folder, "enter" or "list"). None when the
    way is open, or leads nowhere (a missing path is not a permission problem)."""
    parts = Path(os.path.abspath(pattern)).parts
    folder = parts[0]
    for part in parts[1:]:
        if glob.escape(part) != part:  # glob characters: the folder before them is listed
            return _refused(folder, listed=True)
        if refused := _refused(folder, listed=False):
            return refused
        folder = os.path.join(folder, part)
        if not os.path.isdir(folder):
            return None
    return _refused(folder, listed=True)


def _refused(folder: str, listed: bool) -> tuple[str, str] | None:
    if listed:
        return None if os.access(folder, os.R_OK | os.X_OK) else (folder, "list")
    return None if os.access(folder, os.X_OK) else (folder, "enter")


def folder_problem(pattern: str) -> str | None:
    """Why `pattern` finds no files because of a folder's permissions, with the fix; or None."""
    blocked = blocked_folder(pattern)
    if blocked is None:
        return None
    folder, need = blocked
    how = ("entered", "x") if need == "enter" else ("listed", "rx")
    return (f"the folder {folder} cannot be {how[0]} by {running_as()}, the user npyloader runs as "
            f"({_describe(folder)}); give that user access (e.g. chmod o+{how[1]} {folder}, or chown or chgrp it), "
            f"{RUN_AS_ANOTHER}")


def file_problem(path: str) -> str:
    """Why opening `path` was refused (EACCES): a folder on its way, or the file itself."""
    found = folder_problem(path)
    if found is not None:
        return found
    return (f"it cannot be read by {running_as()}, the user npyloader runs as ({_describe(path)}); "
            f"give that user access (e.g. chmod o+r {path}, or chown or chgrp it), {RUN_AS_ANOTHER}")
