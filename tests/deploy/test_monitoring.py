"""The compose `monitoring` profile: its wiring, its Prometheus config and its Grafana dashboard,
checked against what a real server and worker export and, where Debian's prometheus package is
installed (tools/local-docker.sh installs it), by a real Prometheus scraping them and answering
every dashboard query."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from loader_client import BatchStream, request_stats
from tests.helpers import (
    free_port,
    http_get,
    kill_group,
    launch,
    metrics_url,
    scrape,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "docker" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "npyloader.json"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
METRIC = re.compile(r"\bnpyloader_[a-z_]+\b")
# Series a fresh, fault-free run has no samples for: they appear with their first event.
EMPTY_WHEN_HEALTHY = ("npyloader_rejected_messages_total",)


def dashboard_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path, monitoring", [(ROOT / "compose.yaml", "./docker/monitoring"),
                                              (ROOT / "docker" / "compose.yaml", "./monitoring")])
def test_the_monitoring_profile_wires_prometheus_and_grafana_to_the_loader_and_workers(path, monitoring):
    services = compose(path)["services"]
    assert "--metrics-port 9100" in services["loader"]["command"]
    assert "--metrics-port 9101" in services["worker"]["command"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"]
    assert "profiles" not in services["loader"] and "profiles" not in services["worker"]
    assert f"{monitoring}/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert f"{monitoring}/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert f"{monitoring}/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    for mount in prometheus["volumes"] + grafana["volumes"]:
        assert (path.parent / mount.split(":")[0]).exists(), mount

    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["npyloader-loader"]["static_configs"] == [{"targets": ["loader:9100"]}]
    assert jobs["npyloader-worker"]["dns_sd_configs"][0] | {"refresh_interval": None} == {
        "names": ["worker"], "type": "A", "port": 9101, "refresh_interval": None}, "every replica, by DNS"

    source = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [datasource] = source["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/npyloader.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        assert panel["description"], f"panel {panel['title']!r} says what it shows"
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])


def test_docker_compose_reads_the_profile():
    """docker-compose itself (v1, as on this machine) parses the file with the profile on."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (tools/local-docker.sh up installs it)")
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "--profile", "monitoring", "config",
                          "--services"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent.sock"})
    assert out.returncode == 0, out.stderr
    # v1's `config --services` lists every service, whatever its profile: the trainer example too
    assert set(out.stdout.split()) == {"loader", "worker", "prometheus", "grafana", "trainer"}


def test_promtool_accepts_the_prometheus_config():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; tools/local-docker.sh up installs it)")
    out = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def exporting(start_server, start_worker, id_dataset):
    """A server with one local worker and a remote worker host, both exporting metrics."""
    folder, _ = id_dataset
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "8",
                          "--worker-bind", "tcp://127.0.0.1:0", "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                          workers=1)
    worker = start_worker(server.worker_endpoint, "--metrics-port", "0", "--metrics-host", "127.0.0.1", processes=1)
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 60, "both workers ready")
    return server, metrics_url(server.log()), wait_for(lambda: metrics_url(worker.log()), 30, "worker metrics")


def test_every_dashboard_query_names_metrics_the_services_export(exporting):
    server, server_url, worker_url = exporting
    with BatchStream(server.endpoint, timeout=30) as stream:
        list(stream)
        exported = set(wait_for(lambda: (s := scrape(server_url)).get("npyloader_client_batches_total") and s, 10,
                                "the client in the metrics"))
    exported |= set(scrape(worker_url)) | set(EMPTY_WHEN_HEALTHY)
    for title, expr in dashboard_queries():
        for name in METRIC.findall(expr):
            assert name in exported, f"panel {title!r} queries {name}, which nothing exports"


def test_a_real_prometheus_scrapes_both_and_answers_every_panel(exporting, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian's prometheus package; tools/local-docker.sh up installs it)")
    server, server_url, worker_url = exporting
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    # The same jobs, with this host's targets: Prometheus's DNS discovery asks DNS servers
    # directly (not /etc/hosts), and there is no compose network here to resolve `worker`.
    targets = {"npyloader-loader": server_url, "npyloader-worker": worker_url}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [urllib.parse.urlsplit(targets[job["job_name"]]).netloc]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    api = f"127.0.0.1:{free_port()}"
    proc = launch(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                   f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={api}"],
                  tmp_path / "prometheus.log")
    try:
        def query(expr: str) -> list:
            url = f"http://{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                answer = json.loads(http_get(url, timeout=5)[1])
            except OSError:
                return []
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        wait_for(lambda: len(query("up == 1")) == 2, 60, "Prometheus to scrape the loader and the worker host")
        with BatchStream(server.endpoint, timeout=30) as stream:
            for title, expr in dashboard_queries():
                if any(name in expr for name in EMPTY_WHEN_HEALTHY):
                    query(expr)  # valid PromQL is all that can be asked of a series with no events yet
                    continue

                def answered() -> bool:
                    list(stream)  # another epoch, so rates over the last minute keep moving
                    return bool(query(expr))

                wait_for(answered, 60, f"panel {title!r} to show data: {expr}", interval=0.5)
    finally:
        kill_group(proc, grace=20)  # SIGTERM, and SIGKILL should Prometheus not stop within 20 s
