"""Two hosts (network namespaces joined by a veth pair) serve one training run exactly once."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from loader_server.tools.netlab.hosts import netns_unavailable_reason, two_hosts
from tests.helpers import serve_command, wait_for, write_id_dataset

UNAVAILABLE = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no test hosts: {UNAVAILABLE}")

TRAINER = textwrap.dedent("""
    import sys
    import numpy as np
    from loader_client import BatchStream, request_stats
    url = sys.argv[1]
    with BatchStream(url, timeout=60) as stream:
        ids = sorted(int(v) for _, y in stream for v in y)
    workers = request_stats(url)["workers"]["list"]
    print("ids-ok" if ids == list(range(int(sys.argv[2]))) else f"ids-wrong {len(ids)} {len(set(ids))}")
    print("remote-batches", sum(w["batches"] for w in workers if not w["local"]))
""")


def test_server_on_one_host_workers_and_trainer_on_another(tmp_path):
    n = write_id_dataset(tmp_path / "ids", [120, 90, 50])
    with two_hosts() as (server_host, worker_host):
        log_path = tmp_path / "server.log"
        with open(log_path, "w") as log:
            server = server_host.popen(
                serve_command("serve", "--data", str(tmp_path / "ids"), "--label-column", "-1", "--batch-size", "16",
                              "--workers", "0", "--bind", f"tcp://{server_host.address}:5555",
                              "--worker-bind", f"tcp://{server_host.address}:5556"),
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: re.search(r"serving .* at", log_path.read_text()) or server.poll() is not None, 90,
                 "the server on host A")
        assert server.poll() is None, log_path.read_text()
        worker_log = tmp_path / "worker.log"
        with open(worker_log, "w") as log:
            worker_host.popen(serve_command("worker", "--connect", f"tcp://{server_host.address}:5556",
                                            "--processes", "2"), stdout=log, stderr=subprocess.STDOUT)
        result = worker_host.run([sys.executable, "-c", TRAINER, f"tcp://{server_host.address}:5555", str(n)],
                                 capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr + log_path.read_text() + worker_log.read_text()
        assert "ids-ok" in result.stdout, result.stdout
        remote = int(result.stdout.split("remote-batches")[1])
        assert remote == 17, "every batch was built on the other host"
        assert "accepts plain, unauthenticated tcp" in log_path.read_text()
