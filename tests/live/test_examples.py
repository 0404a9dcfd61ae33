"""The examples under examples/, run as a reader runs them: one command, with small settings.

Each example starts its own `npyloader serve` in its own process group; the test starts the
example in a group of its own, so after the example exits, whatever is left of that group is
something the example failed to stop.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import describe, group_members, kill_group, launch, pid_alive, wait_for

ROOT = Path(__file__).resolve().parents[2]
SEGMENTATION = [sys.executable, str(ROOT / "examples" / "segmentation" / "run.py"),
                "--train", "256", "--val", "64", "--epochs", "8"]
SERVER_PID = re.compile(r"npyloader serve \(pid (\d+)\) ready")


def assert_nothing_outlived(proc: subprocess.Popen, output: str) -> None:
    """The example's server, its workers and multiprocessing's resource tracker all left by
    themselves within moments of the example: nothing the example started outlives it."""
    try:
        wait_for(lambda: not group_members(proc.pid), 10, "the example's processes to exit")
    except AssertionError:
        raise AssertionError(f"outlived the example: {describe(group_members(proc.pid))}\n{output[-3000:]}") from None
    server_pid = int(SERVER_PID.search(output).group(1))
    assert not pid_alive(server_pid)


@pytest.mark.slow
def test_segmentation_example_reaches_a_dice_well_above_a_blank_prediction(tmp_path):
    log_path = tmp_path / "example.log"
    proc = launch([*SEGMENTATION, "--out", str(tmp_path / "data")], log_path)
    try:
        proc.wait(300)
        output = log_path.read_text()
        assert proc.returncode == 0, output[-3000:]
        assert_nothing_outlived(proc, output)
    finally:
        kill_group(proc)
    scores = re.search(r"validation Dice (\d\.\d+) after 8 epochs; without a model: blank prediction (\d\.\d+), "
                       r"mean training mask (\d\.\d+), scan > 0.5 (\d\.\d+)", output)
    assert scores, output[-3000:]
    dice, blank, mean, threshold = map(float, scores.groups())
    assert dice > 0.5 and dice > blank + 0.4 and dice > max(mean, threshold), output[-3000:]
    assert len(re.findall(r"^epoch +\d+/8 .* val_dice \d\.\d+", output, re.MULTILINE)) == 8
    assert re.search(r"npyloader serve \(pid \d+\) stopped: exit status 0", output)


@pytest.mark.slow
@pytest.mark.parametrize(("how", "sig", "status"), [("group", signal.SIGINT, 130), ("process", signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_segmentation_example_stops_its_server_when_interrupted_mid_training(tmp_path, how, sig, status):
    """Ctrl-C in a terminal signals the whole foreground group (the example and its server); a
    supervisor's SIGTERM reaches the example alone. Either way the server goes with it, and so
    does the temporary folder the example wrote its scans to."""
    log_path = tmp_path / "example.log"
    proc = launch([*SEGMENTATION, "--epochs", "50"], log_path)
    try:
        wait_for(lambda: re.search(r"^epoch +1/50", log_path.read_text(), re.MULTILINE) or proc.poll() is not None,
                 240, "the example's first epoch")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        if how == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(60)
        output = log_path.read_text()
        assert proc.returncode == status, output[-3000:]
        assert_nothing_outlived(proc, output)
        data = re.search(r"with masks to (\S+)", output).group(1)
        assert not Path(data).exists()
    finally:
        kill_group(proc)
