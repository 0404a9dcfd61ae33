"""The Kubernetes manifests in docker/k8s/: their structure, and kubectl reading them offline.

Structure checks parse the YAML with PyYAML (skipped, saying so, when it is not installed).
The kubectl checks run only where `kubectl` is on PATH and never contact a cluster:
`kubectl apply/create --dry-run=client` still ask the API server for its resource list even
with `--validate=false` (kubectl 1.32: "unable to recognize ... connection refused"), so they
cannot run offline. What kubectl can do without a server is build the kustomization
(`kubectl kustomize`) and decode each file (`kubectl annotate --local --dry-run=client`).
Schema validation against a real API server is `kubectl apply -k docker/k8s/ --dry-run=server`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"
MANIFESTS = ["data-pvc.yaml", "loader.yaml", "worker.yaml"]
STATS_PROBE = ["npyloader", "stats", "tcp://127.0.0.1:5555", "--timeout", "3"]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")


# --- PyYAML: structure -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def objs() -> dict[tuple[str, str], dict]:
    """Every object in the manifests, by (kind, name)."""
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed (pip install pyyaml); manifest structure unchecked")
    out: dict[tuple[str, str], dict] = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def pod_spec(objs, name: str) -> dict:
    return objs[("Deployment", name)]["spec"]["template"]["spec"]


def container(objs, name: str) -> dict:
    containers = pod_spec(objs, name)["containers"]
    assert len(containers) == 1, f"{name}: expected one container"
    return containers[0]


def mounts(objs, name: str) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod_spec(objs, name)["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(objs, name)["volumeMounts"]}


def quantity(q: str) -> float:
    """Bytes in a Kubernetes memory quantity such as 512Mi, 2Gi or 1G."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(q))
    assert m, f"unexpected quantity {q!r}"
    unit = m.group(2) or ""
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return float(m.group(1)) * scale


def test_manifests_define_exactly_the_expected_objects(objs):
    assert set(objs) == {
        ("PersistentVolumeClaim", "npyloader-data"),
        ("Deployment", "npyloader-loader"),
        ("Service", "npyloader-loader"),
        ("Deployment", "npyloader-worker"),
    }


@pytest.mark.parametrize("name", ["npyloader-loader", "npyloader-worker"])
def test_deployments_run_the_image_entrypoint_with_resources_and_readonly_data(objs, name):
    dep = objs[("Deployment", name)]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "selector misses pods"
    c = container(objs, name)
    assert c["image"].split(":")[0].endswith("npyloader"), c["image"]
    assert "command" not in c, "command would replace the image's ENTRYPOINT [npyloader]"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys(), f"{name}: resources.{kind}"

    mount, volume = mounts(objs, name)["/data"]
    assert mount["readOnly"] is True
    assert volume["persistentVolumeClaim"] == {"claimName": "npyloader-data", "readOnly": True}

    sec = pod_spec(objs, name)["securityContext"]
    assert sec["runAsNonRoot"] is True and isinstance(sec["runAsUser"], int) and sec["runAsUser"] > 0


def test_loader_serves_clients_and_workers_with_stats_probes_and_memory_shm(objs):
    dep = objs[("Deployment", "npyloader-loader")]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate", "two brokers would split clients"
    c = container(objs, "npyloader-loader")
    args = c["args"]
    assert args[0] == "serve"
    pairs = dict(zip(args[1::2], args[2::2]))
    assert pairs["--config"] == "/data/loader.toml"
    assert pairs["--bind"] == "tcp://0.0.0.0:5555"
    assert pairs["--worker-bind"] == "tcp://0.0.0.0:5556"
    assert pairs["--workers"] == "0"
    assert pairs["--metrics-port"] == "9100"
    assert {p["containerPort"] for p in c["ports"]} == {5555, 5556, 9100}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"}

    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == STATS_PROBE, probe
        # the stats command waits up to 3 s for the answer, plus its own start-up
        assert c[probe]["timeoutSeconds"] > 3, probe

    mount, volume = mounts(objs, "npyloader-loader")["/dev/shm"]
    assert not mount.get("readOnly")
    assert volume["emptyDir"]["medium"] == "Memory"
    shm = quantity(volume["emptyDir"]["sizeLimit"])
    assert quantity(c["resources"]["limits"]["memory"]) > shm, "tmpfs pages count in the limit"


def test_service_exposes_client_and_worker_ports_of_the_loader_pods(objs):
    svc = objs[("Service", "npyloader-loader")]
    pod_labels = objs[("Deployment", "npyloader-loader")]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    worker_labels = objs[("Deployment", "npyloader-worker")]["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= worker_labels.items(), "service selects workers"

    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {5555, 5556}
    named = {p["name"]: p["containerPort"] for p in container(objs, "npyloader-loader")["ports"]}
    for port, p in ports.items():
        target = p.get("targetPort", port)
        assert named.get(target, target) == port, f"service port {port} -> {target}"


def test_worker_connects_to_the_service_and_spreads_over_nodes(objs):
    dep = objs[("Deployment", "npyloader-worker")]
    assert dep["spec"]["replicas"] >= 2
    args = container(objs, "npyloader-worker")["args"]
    assert args[0] == "worker"
    pairs = dict(zip(args[1::2], args[2::2]))
    assert pairs["--connect"] == f"tcp://{objs[('Service', 'npyloader-loader')]['metadata']['name']}:5556"
    assert int(pairs["--processes"]) >= 1

    spec = pod_spec(objs, "npyloader-worker")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    spread = [t for t in spec.get("topologySpreadConstraints", [])
              if t["topologyKey"] == "kubernetes.io/hostname"
              and t["labelSelector"]["matchLabels"].items() <= labels.items()]
    anti = (spec.get("affinity", {}).get("podAntiAffinity", {})
            .get("preferredDuringSchedulingIgnoredDuringExecution", []))
    assert spread or anti, "worker replicas are not spread across nodes"

    # A worker probe must not depend on the loader: it reconnects by itself.
    probe = container(objs, "npyloader-worker").get("livenessProbe")
    assert probe is None or "5555" not in str(probe) and "5556" not in str(probe)


def test_data_claim_is_read_only_many(objs):
    pvc = objs[("PersistentVolumeClaim", "npyloader-data")]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) > 0


def test_kustomization_lists_every_manifest():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(MANIFESTS)


def test_manifest_arguments_parse_with_the_npyloader_cli(objs):
    """The args and probe commands are ones this checkout's `npyloader` accepts."""
    from loader_server import cli

    parser = cli._build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "worker" in commands, "the worker Deployment runs `npyloader worker`, which the CLI must have"
    argvs = [container(objs, "npyloader-loader")["args"], container(objs, "npyloader-worker")["args"],
             STATS_PROBE[1:]]
    for argv in argvs:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"npyloader {' '.join(argv)}: rejected by the CLI (exit {e.code})")


def test_readme_gives_the_commands():
    text = (K8S / "README.md").read_text()
    for needle in ("kubectl apply -k docker/k8s/", "kubectl scale deployment npyloader-worker --replicas=",
                   "tcp://npyloader-loader:5555", "--curve-secret-key", "--authorized-keys",
                   "--curve-server-key"):
        assert needle in text, needle


# --- kubectl, offline ------------------------------------------------------------------------


def kubectl(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # An empty kubeconfig: whatever cluster the developer's own config names is never asked.
    cfg = tmp_path / "kubeconfig"
    cfg.write_text("apiVersion: v1\nkind: Config\n")
    env = {**os.environ, "KUBECONFIG": str(cfg)}
    return subprocess.run([KUBECTL, *argv], capture_output=True, text=True, timeout=60, env=env)


@needs_kubectl
@pytest.mark.parametrize("name", MANIFESTS)
def test_kubectl_reads_each_manifest(name, tmp_path):
    r = kubectl("annotate", "--local", "--dry-run=client", "-o", "yaml", "-f", str(K8S / name),
                "npyloader.test/checked=1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "npyloader.test/checked" in r.stdout


@needs_kubectl
def test_kubectl_builds_the_kustomization(tmp_path):
    r = kubectl("kustomize", str(K8S), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    kinds = re.findall(r"^kind: (\w+)$", r.stdout, flags=re.M)
    assert sorted(kinds) == ["Deployment", "Deployment", "PersistentVolumeClaim", "Service"], r.stdout
    assert "image: npyloader:local" in r.stdout
