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
# Examples applied on their own, not by the kustomization: the trainer pod with its loader sidecar.
EXAMPLES = ["trainer-pod.yaml"]
DOCKERFILE = K8S.parent / "Dockerfile"
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
    # A Job is a run, not a service: `kubectl apply -k` must not start a training (README.md).
    assert not set(EXAMPLES) & set(k["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(MANIFESTS) | set(EXAMPLES), "a manifest that is neither deployed nor an example"


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
                   "--curve-server-key", "kubectl apply -f docker/k8s/trainer-pod.yaml",
                   "tcp://127.0.0.1:5555", "medium: Memory", "runAsUser"):
        assert needle in text, needle


# --- the trainer pod: a loader sidecar sharing /dev/shm -------------------------------------


@pytest.fixture(scope="module")
def trainer_job() -> dict:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed (pip install pyyaml); manifest structure unchecked")
    docs = [d for d in yaml.safe_load_all((K8S / "trainer-pod.yaml").read_text()) if d is not None]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Job", "npyloader-trainer")]
    return docs[0]


def _run_as(pod: dict, c: dict) -> dict:
    """The container's effective user settings: its own securityContext over the pod's."""
    pod_sec = pod.get("securityContext", {})
    own = c.get("securityContext", {})
    return {k: own.get(k, pod_sec.get(k)) for k in ("runAsUser", "runAsGroup", "runAsNonRoot")}


def test_trainer_pod_shares_a_memory_dev_shm_and_the_uid_with_its_loader_sidecar(trainer_job):
    labels = trainer_job["spec"]["template"]["metadata"]["labels"]
    assert trainer_job["metadata"]["labels"] == labels
    pod = trainer_job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure"), "a Job's pod"
    [loader] = pod["initContainers"]
    [trainer] = pod["containers"]
    assert loader["name"] == "loader" and trainer["name"] == "trainer"
    # A native sidecar: started before the trainer, stopped after it, so the Job completes.
    assert loader["restartPolicy"] == "Always"
    assert loader["startupProbe"]["exec"]["command"] == STATS_PROBE, "the trainer starts once the loader answers"
    assert "command" not in loader, "command would replace the image's ENTRYPOINT [npyloader]"

    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = {}
    for c in (loader, trainer):
        at = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(at) == 1, f"{c['name']}: /dev/shm"
        assert not at[0].get("readOnly") and not at[0].get("subPath"), f"{c['name']}: the whole volume, writable"
        shm[c["name"]] = at[0]["name"]
    assert shm["loader"] == shm["trainer"], "one /dev/shm for both containers"
    emptydir = volumes[shm["loader"]]["emptyDir"]
    assert emptydir["medium"] == "Memory"
    assert quantity(loader["resources"]["limits"]["memory"]) > quantity(emptydir["sizeLimit"]), \
        "the loader reserves the segments' pages: they count in its limit"

    # One uid, the image's: the segments are mode 0600.
    image_uid = int(re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.M).group(1))
    users = {c["name"]: _run_as(pod, c) for c in (loader, trainer)}
    assert users["loader"] == users["trainer"], users
    assert users["loader"]["runAsUser"] == image_uid and users["loader"]["runAsNonRoot"] is True, users

    data = [m for m in loader["volumeMounts"] if m["mountPath"] == "/data"]
    assert data and data[0]["readOnly"] is True
    assert volumes[data[0]["name"]]["persistentVolumeClaim"] == {"claimName": "npyloader-data", "readOnly": True}


def test_trainer_pod_loader_serves_the_pod_only_with_local_workers(trainer_job):
    """Loopback bind (the pod's network namespace is shared), local workers (only their batches are
    in shared memory), arguments this checkout's CLI accepts; the trainer connects to loopback."""
    from loader_server import cli

    pod = trainer_job["spec"]["template"]["spec"]
    [loader], [trainer] = pod["initContainers"], pod["containers"]
    args = loader["args"]
    parsed = cli._build_parser().parse_args(args)  # SystemExit (a failure) if the CLI rejects them
    assert parsed.command == "serve" and parsed.config == "/data/loader.toml"
    assert parsed.bind == "tcp://127.0.0.1:5555"
    assert parsed.workers >= 1
    assert parsed.worker_bind is None, "nothing outside the pod joins unless asked for"
    assert {p["containerPort"] for p in loader.get("ports", [])} <= {9100}

    command = trainer["command"]
    assert command[:2] == ["python", "-c"] and len(command) == 3
    compile(command[2], "trainer-pod.yaml trainer", "exec")
    assert 'BatchStream("tcp://127.0.0.1:5555"' in command[2] and "stream.stats()" in command[2]


# --- kubectl, offline ------------------------------------------------------------------------


def kubectl(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # An empty kubeconfig: whatever cluster the developer's own config names is never asked.
    cfg = tmp_path / "kubeconfig"
    cfg.write_text("apiVersion: v1\nkind: Config\n")
    env = {**os.environ, "KUBECONFIG": str(cfg)}
    return subprocess.run([KUBECTL, *argv], capture_output=True, text=True, timeout=60, env=env)


@needs_kubectl
@pytest.mark.parametrize("name", MANIFESTS + EXAMPLES)
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
