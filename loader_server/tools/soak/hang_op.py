"""The soak's own augment op: does nothing, until a fault arms it to hang one worker process.

The soak's `train` dataset runs `hang_once` on every sample. The hung_op fault arms it by
creating a trigger file in the soak's folder named after the parent of the process that must
hang (the server, for a local worker; `npyloader worker`, for a remote one) and how it hangs:
`hang-<ppid>-sleep` or `hang-<ppid>-spin`. The first worker process of that parent to call the
op claims the trigger by renaming it to `hung-<its pid>` (a rename succeeds once, so exactly one
process hangs), then never returns: in C (`time.sleep`, the GIL released) or spinning in Python.
Either way its socket thread keeps heartbeating, so only --task-timeout can end it. The server
itself (it runs the ops once at startup) and the soak's clients (they recompute rows) are not
workers of such a parent, so they never claim it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HOWS = ("sleep", "spin")
OP = "loader_server.tools.soak.hang_op:hang_once"


def trigger(folder: Path, parent_pid: int, how: str) -> Path:
    return folder / f"hang-{parent_pid}-{how}"


def claimed(folder: Path) -> list[Path]:
    """Triggers claimed so far (`hung-PID`), for the fault to find which process took one."""
    return sorted(folder.glob("hung-*"))


def spec(folder: Path) -> str:
    """The `--augment` text that runs this op with triggers looked for in `folder`."""
    return f"{OP}:folder={folder}"


def hang_once(x, y, rng, folder: str = ""):
    """Identity (draws nothing from `rng`, so the batches' bytes are those of a run without it),
    unless this process claims an armed trigger: then it never returns."""
    parent = os.getppid()
    for how in HOWS:
        try:
            os.rename(trigger(Path(folder), parent, how), Path(folder) / f"hung-{os.getpid()}")
        except FileNotFoundError:
            continue
        if how == "sleep":
            while True:
                time.sleep(60)
        while True:
            pass
    return x, y
