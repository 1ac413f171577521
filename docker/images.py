"""Build splitfed's container images and smoke-test them as an operator runs them
(``make images``, ``make images-test``; docs/deploy.md "Building and testing the
images").

The engine is podman where it runs, else docker. What a host needs is detected, not
assumed:

* **podman's runtime and limits**: on a host with the hybrid cgroup layout (cgroup v1
  with a v2 ``unified`` mount) crun refuses to start containers, so runc and the
  cgroupfs manager are chosen; podman's default ``nofile`` limit (1048576) fails with
  EPERM where the hard limit is lower, so the host's hard limits become the containers'
  defaults. These go to a ``containers.conf`` under build/ passed as ``CONTAINERS_CONF``
  (one already set in the environment is left alone).
* **the base image**: ``--python-image`` (or ``$PYTHON_IMAGE``) if given; else the
  Dockerfile's default if the engine has it or can pull it; else, with ``mmdebstrap``, a
  minimal Debian bookworm with Python built from the host's own Debian mirror and
  imported as ``localhost/splitfed-base:bookworm`` (no registry needed).
* **pip behind a proxy**: the CA bundle pip uses here (``$PIP_CERT``,
  ``$REQUESTS_CA_BUNDLE`` or ``$SSL_CERT_FILE``) and a local wheel directory
  (``$PIP_FIND_LINKS``) are bind-mounted into the build's RUN steps (podman ``-v``), so
  neither lands in a layer; with a torch wheel there, torch comes from it and the
  Dockerfile's ``TORCH_INDEX_URL`` becomes pip's own index.

Commands::

    python docker/images.py build [--cuda] [--python-image IMAGE]
    python docker/images.py test
    python docker/images.py deploy

``build`` builds ``localhost/splitfed:<version>-cpu`` from docker/Dockerfile.cpu and, with
``--cuda``, docker/Dockerfile.cuda structurally on the same base
(``localhost/splitfed:<version>-cuda-structure``: its steps, users and layout, not the
CUDA libraries). ``test`` runs the CPU image read-only, without capabilities, as uid
10001 with a tmpfs /tmp: its CLI, ``keys init`` into a volume, ``serve diagnostics``
over mTLS answered by ``splitfed health`` from another container, the image's
HEALTHCHECK, and a clean exit on SIGTERM. ``deploy`` runs the whole deployment in
containers on one network, as the Kubernetes manifests run it (their configs from
k8s/base/config and the dev overlay, their init scripts, paths, identities and security
context): the dev overlay's tiny model, the key manager initialised by
``keymanager-init.sh``, one-time tokens made inside its container, the backbone and the
aggregator enrolled by ``enroll.sh``, two clients enrolled with ``keys enroll`` that
train the dev federation (3 rounds, secure aggregation, encrypted sessions) at once, a
generation, each service's metrics scraped, and every service stopped with exit status
0. Each step prints what it ran and how long it took; any failure exits 1 with the
engine's output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "images"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CPU_IMAGE = f"localhost/splitfed:{VERSION}-cpu"
CUDA_IMAGE = f"localhost/splitfed:{VERSION}-cuda-structure"
DEFAULT_PYTHON_IMAGE = "python:3.11.13-slim-bookworm"
LOCAL_BASE = "localhost/splitfed-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
TORCH_SPEC = "torch==2.13.0"
# How an operator runs the image (k8s/base: readOnlyRootFilesystem, drop ALL, uid 10001,
# an emptyDir at /tmp).
HARDENED = (
    "--read-only",
    "--tmpfs",
    "/tmp:rw,size=256m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)
UID = 10001


class StepError(Exception):
    """A step failed; the message says which and what the engine said."""


def run(args: Sequence[str], *, check: bool = True, timeout: float = 1800) -> str:
    """Run ``args``, echoing it; its output (stdout and stderr together)."""
    shown = [re.sub(r"^(SPLITFED_(KEK|TOKEN)=).*", r"\1***", a) for a in args]
    print("$ " + " ".join(shown), flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        env=ENV,
    )
    print(f"  ({time.perf_counter() - started:.1f} s, exit {done.returncode})", flush=True)
    if check and done.returncode != 0:
        raise StepError(f"{args[0]} {args[1]} exited {done.returncode}:\n{done.stdout[-4000:]}")
    return done.stdout


ENV = dict(os.environ)


# --- the engine --------------------------------------------------------------------


def engine() -> str:
    """podman where it works, else docker; an error saying what to install."""
    for name in ("podman", "docker"):
        if shutil.which(name) is None:
            continue
        if name == "podman":
            configure_podman()
        probe = subprocess.run(
            [name, "info"], capture_output=True, text=True, env=ENV, check=False, timeout=60
        )
        if probe.returncode == 0:
            return name
        print(f"{name} is installed but does not run here: {probe.stderr.strip()[:300]}")
    raise StepError(
        "neither podman nor docker runs here: install podman (Debian/Ubuntu: apt-get "
        "install podman buildah runc) or start a docker daemon"
    )


def hybrid_cgroups() -> bool:
    """cgroup v1 with a v2 hierarchy mounted beside it (``/sys/fs/cgroup/unified``)."""
    return (
        Path("/sys/fs/cgroup/unified").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    )


def configure_podman() -> None:
    """Write build/images/containers.conf for this host (see the module's docstring) and
    point CONTAINERS_CONF at it, unless the environment already names one."""
    if "CONTAINERS_CONF" in ENV:
        return
    containers, engine_lines = [], []
    limits = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and hard < 1048576:
            value = min(hard, 4096) if name == "nproc" else hard
            limits.append(f'"{name}={value}:{value}"')
    if limits:
        containers.append(f"default_ulimits = [{', '.join(limits)}]")
    if hybrid_cgroups() and shutil.which("runc") is not None:
        engine_lines += ['runtime = "runc"', 'cgroup_manager = "cgroupfs"']
    if not containers and not engine_lines:
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    conf = BUILD / "containers.conf"
    text = "[containers]\n" + "".join(f"{line}\n" for line in containers)
    text += "[engine]\n" + "".join(f"{line}\n" for line in engine_lines)
    conf.write_text(text)
    ENV["CONTAINERS_CONF"] = str(conf)
    print(f"podman settings for this host ({conf}):\n{text}", end="")


def has_image(tool: str, image: str) -> bool:
    if tool == "podman":
        probe = [tool, "image", "exists", image]
    else:
        probe = [tool, "image", "inspect", image]
    return subprocess.run(probe, capture_output=True, env=ENV, check=False).returncode == 0


# --- the build ---------------------------------------------------------------------


def base_image(tool: str, wanted: str | None) -> str:
    """The Python base both Dockerfiles build on (see the module's docstring)."""
    if wanted:
        return wanted
    if has_image(tool, DEFAULT_PYTHON_IMAGE):
        return DEFAULT_PYTHON_IMAGE
    pulled = subprocess.run(
        [tool, "pull", DEFAULT_PYTHON_IMAGE], capture_output=True, env=ENV, check=False, timeout=300
    )
    if pulled.returncode == 0:
        return DEFAULT_PYTHON_IMAGE
    if has_image(tool, LOCAL_BASE):
        return LOCAL_BASE
    if shutil.which("mmdebstrap") is None:
        raise StepError(
            f"cannot pull {DEFAULT_PYTHON_IMAGE} and mmdebstrap is not installed to build a "
            "base from the Debian mirror: apt-get install mmdebstrap, or give --python-image"
        )
    print(f"no registry: building {LOCAL_BASE} from the host's Debian mirror")
    with tempfile.TemporaryDirectory(prefix="splitfed-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tar)])
        run([tool, "import", str(tar), LOCAL_BASE])
    return LOCAL_BASE


def ca_bundle() -> Path | None:
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = ENV.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def wheel_dir() -> Path | None:
    for entry in ENV.get("PIP_FIND_LINKS", "").split():
        path = Path(entry.removeprefix("file://"))
        if path.is_dir():
            return path
    return None


def pip_index() -> str:
    """The index pip uses here (``pip config``), else PyPI."""
    for key in ("global.index-url", ":env:.index-url"):
        found = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", key],
            capture_output=True,
            text=True,
            env=ENV,
            check=False,
        )
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    return "https://pypi.org/simple"


def build_options(tool: str) -> list[str]:
    """The mounts and environment of pip behind a proxy (podman only: docker's build has
    no bind mounts), and the torch index when a local wheel has torch."""
    options = ["--network", "host"]
    if tool == "podman":
        options += ["--format", "docker"]  # keeps HEALTHCHECK
        bundle, wheels = ca_bundle(), wheel_dir()
        if bundle is not None:
            options += ["-v", f"{bundle}:{bundle}:ro", "--env", f"PIP_CERT={bundle}"]
        if wheels is not None:
            options += ["-v", f"{wheels}:{wheels}:ro", "--env", f"PIP_FIND_LINKS={wheels}"]
            if any(wheels.glob(TORCH_SPEC.replace("==", "-") + "*.whl")):
                options += ["--build-arg", f"TORCH_INDEX_URL={pip_index()}"]
    return options


def build(args: argparse.Namespace) -> int:
    tool = engine()
    base = base_image(tool, args.python_image or ENV.get("PYTHON_IMAGE"))
    options = build_options(tool)
    figures = []
    started = time.perf_counter()
    run(
        [
            tool,
            "build",
            *options,
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "-f",
            str(ROOT / "docker" / "Dockerfile.cpu"),
            "-t",
            CPU_IMAGE,
            str(ROOT),
        ]
    )
    figures.append((CPU_IMAGE, time.perf_counter() - started))
    if args.cuda:
        started = time.perf_counter()
        run(
            [
                tool,
                "build",
                *options,
                "--build-arg",
                f"CUDA_IMAGE={base}",
                "-f",
                str(ROOT / "docker" / "Dockerfile.cuda"),
                "-t",
                CUDA_IMAGE,
                str(ROOT),
            ]
        )
        figures.append((CUDA_IMAGE, time.perf_counter() - started))
    for image, seconds in figures:
        size = run([tool, "image", "inspect", "--format", "{{.Size}}", image]).strip()
        print(f"built {image} in {seconds:.0f} s, {int(size) / 1e9:.2f} GB (base {base})")
    return 0


# --- the smoke test ----------------------------------------------------------------


def smoke(args: argparse.Namespace) -> int:
    tool = engine()
    image = args.image
    if not has_image(tool, image):
        raise StepError(f"no image {image}: run `make images` first")
    started = time.perf_counter()
    hardened = [tool, "run", "--rm", *HARDENED]
    out = run([*hardened, "--network", "none", image, "--version"])
    if f"version {VERSION}" not in out:
        raise StepError(f"--version printed {out!r}")
    user = run([*hardened, "--network", "none", "--entrypoint", "id", image])
    if f"uid={UID}" not in user:
        raise StepError(f"the image runs as {user.strip()!r}, not uid {UID}")
    with tempfile.TemporaryDirectory(prefix="splitfed-smoke-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        if os.geteuid() == 0:  # rootful: the image's user writes the state there
            os.chown(work, UID, UID)
        network = f"splitfed-smoke-{os.getpid()}"
        server = f"splitfed-smoke-diag-{os.getpid()}"
        mount = ["-v", f"{work}:/work"]
        run(
            [
                *hardened,
                "--network",
                "none",
                *mount,
                image,
                "keys",
                "init",
                "--state-dir",
                "/work/state",
                "--kek-file",
                "/work/kek",
                "--admin-dir",
                "/work/admin",
                "--dns",
                server,
            ]
        )
        run([tool, "network", "create", network])
        try:
            run(
                [
                    tool,
                    "run",
                    "-d",
                    *HARDENED,
                    "--name",
                    server,
                    "--network",
                    network,
                    *mount,
                    "--env",
                    f"SPLITFED_HEALTH_ADDRESS={server}:7443",
                    "--env",
                    "SPLITFED_TLS_DIR=/work/admin",
                    image,
                    "serve",
                    "diagnostics",
                    "--listen",
                    "0.0.0.0:7443",
                    "--tls-dir",
                    "/work/state/server",
                ]
            )
            run(
                [
                    *hardened,
                    "--network",
                    network,
                    *mount,
                    image,
                    "health",
                    f"{server}:7443",
                    "--tls-dir",
                    "/work/admin",
                    "--wait",
                    "60",
                ]
            )
            if tool == "podman":
                run([tool, "healthcheck", "run", server])
            run([tool, "stop", "--time", "20", server])
            code = run([tool, "inspect", "--format", "{{.State.ExitCode}}", server]).strip()
            if code != "0":
                logs = run([tool, "logs", server], check=False)
                raise StepError(f"serve diagnostics exited {code} on SIGTERM:\n{logs[-3000:]}")
        finally:
            run([tool, "rm", "-f", server], check=False)
            run([tool, "network", "rm", network], check=False)
    print(f"smoke test of {image} passed in {time.perf_counter() - started:.0f} s")
    return 0


# --- the deployment in containers ----------------------------------------------------

K8S = ROOT / "k8s"
KEYMANAGER = "splitfed-keymanager"
BACKBONE = "splitfed-backbone-0"
AGGREGATOR = "splitfed-aggregator-0"
CLIENTS = ("hospital-a", "hospital-b")
# The containers' view of the k8s volumes (k8s/base/*.yaml).
STATE = "/var/lib/splitfed"
CONFIG = "/etc/splitfed/config"
SCRIPTS = "/opt/splitfed/scripts"
CA_DIR = "/etc/splitfed/ca"
BOOTSTRAP = "/var/run/splitfed/bootstrap"
# A figure each service's metrics must show after the run (port 9090, as in k8s).
METRICS = {
    KEYMANAGER: ("splitfed_keymanager_certificates_issued_total", {"kind": "enroll"}),
    BACKBONE: ("splitfed_backbone_compute_seconds_count", {"operation": "forward"}),
    AGGREGATOR: ("splitfed_aggregator_rounds_total", {"federation": "demo", "outcome": "closed"}),
}
CLIENT_CONFIG = """\
[backbone]
address = "{backbone}:7443"
tls_dir = "/work/tls"

[training]
model_path = "/models/tiny"
data = "{data}"
checkpoint_dir = "/work/checkpoint"
batch_size = 8
max_length = 48
encrypted = true

[adapter]
kind = "lora"
r = 16
alpha = 32
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
seed = 0

[optimizer]
learning_rate = 0.003
schedule = "constant"

[generation]
max_new_tokens = 8

[federated]
aggregator = "{aggregator}:7445"
federation = "demo"

[security]
keymanager = "{keymanager}:7443"
"""
# The dev overlay's init container `tiny-model`, run as k8s runs it (read from the patch).
TINY_MODEL = """\
import sys, yaml
patch = yaml.safe_load(open(sys.argv[1]))
init = next(c for c in patch["spec"]["template"]["spec"]["initContainers"]
            if c["name"] == "tiny-model")
assert init["command"][:2] == ["python", "-c"], init["command"]
exec(init["command"][2])
"""


class Deployment:
    """Key manager, backbone, aggregator and two clients as containers on one network,
    each with the k8s manifests' configs, scripts, paths and security settings."""

    def __init__(self, tool: str, image: str, root: Path) -> None:
        self.tool, self.image, self.root = tool, image, root
        self.network = f"splitfed-deploy-{os.getpid()}"
        self.kek = os.urandom(24).hex()
        self.services: list[str] = []
        self.timings: list[tuple[str, float]] = []

    def volume(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, UID, UID)
        return path

    def container(self, *options: str, detach: str = "") -> list[str]:
        """``run`` with the pods' security context, on the deployment's network."""
        start = ["-d", "--name", detach] if detach else ["--rm"]
        return [self.tool, "run", *start, *HARDENED, "--network", self.network, *options]

    def mounts(self, **volumes: str) -> list[str]:
        """-v options: ``volumes`` maps a directory under root to a container path (a
        ``_ro`` suffix on the container path's key: read-only)."""
        out = []
        for name, target in volumes.items():
            read_only = name.endswith("_ro")
            source = self.volume(name.removesuffix("_ro"))
            out += ["-v", f"{source}:{target}{':ro' if read_only else ''}"]
        return out

    def step(self, what: str, args: Sequence[str], **kwargs: Any) -> str:
        started = time.perf_counter()
        out = run(args, **kwargs)
        self.timings.append((what, time.perf_counter() - started))
        return out

    def serve(self, name: str, alias: str, args: Sequence[str], *options: str) -> None:
        self.step(
            f"start {name}",
            self.container(
                "--network-alias",
                alias,
                "--env",
                "SPLITFED_LOG_FORMAT=json",
                *options,
                self.image,
                *args,
                detach=name,
            ),
        )
        self.services.append(name)

    def health(self, address: str, tls: list[str], server_name: str) -> None:
        self.step(
            f"{address} serving",
            self.container(
                *tls,
                self.image,
                "health",
                address,
                "--tls-dir",
                "/tls",
                "--server-name",
                server_name,
                "--wait",
                "180",
            ),
        )

    def run_all(self) -> None:
        tool, image = self.tool, self.image
        configs = self.volume("config")
        shutil.copy(K8S / "base" / "config" / "keymanager.yaml", configs)
        for name in ("backbone.yaml", "aggregator.yaml"):
            shutil.copy(K8S / "overlays" / "dev" / name, configs)
        shutil.copy(K8S / "overlays" / "dev" / "backbone-patch.yaml", configs)
        for path in configs.iterdir():
            path.chmod(0o644)
        scripts = ["-v", f"{K8S / 'base' / 'scripts'}:{SCRIPTS}:ro"]
        config = ["-v", f"{configs}:{CONFIG}:ro"]
        self.step(
            "tiny model (the dev overlay's init container)",
            self.container(
                *config,
                *self.mounts(models="/models"),
                "--entrypoint",
                "python",
                image,
                "-c",
                TINY_MODEL,
                f"{CONFIG}/backbone-patch.yaml",
            ),
        )
        kek = ["--env", f"SPLITFED_KEK={self.kek}"]
        km = self.mounts(keymanager=STATE)
        self.step(
            "key manager init (keymanager-init.sh)",
            self.container(
                *km,
                *scripts,
                *kek,
                "--env",
                f"SPLITFED_STATE_DIR={STATE}/keymanager",
                "--env",
                f"SPLITFED_ADMIN_DIR={STATE}/admin",
                "--env",
                "POD_NAMESPACE=splitfed",
                "--entrypoint",
                "/bin/sh",
                image,
                f"{SCRIPTS}/keymanager-init.sh",
            ),
        )
        self.serve(
            KEYMANAGER,
            KEYMANAGER,
            ["serve", "keymanager", "--config", f"{CONFIG}/keymanager.yaml"],
            *km,
            *config,
            *kek,
            "--env",
            "SPLITFED_KEYMANAGER=localhost:7443",
            "--env",
            f"SPLITFED_TLS_DIR={STATE}/admin",
        )
        admin = self.root / "keymanager" / "admin"
        self.health(f"{KEYMANAGER}:7443", ["-v", f"{admin}:/tls:ro"], KEYMANAGER)
        ca = self.volume("ca")
        shutil.copy(self.root / "keymanager" / "keymanager" / "ca.pem", ca / "ca.pem")
        (ca / "ca.pem").chmod(0o644)
        bootstrap = self.volume("bootstrap")
        tokens = {
            AGGREGATOR: ["--role", "aggregator", "--dns", AGGREGATOR],
            BACKBONE: ["--role", "backbone", "--dns", BACKBONE],
            **{client: ["--role", "client"] for client in CLIENTS},
        }
        for identity, options in tokens.items():
            token = self.step(
                f"token for {identity}",
                [
                    tool,
                    "exec",
                    KEYMANAGER,
                    "splitfed",
                    "keys",
                    "token",
                    "create",
                    identity,
                    "--ttl",
                    "3600",
                    *options,
                ],
            )
            # The token is stdout's line; its expiry goes to stderr (merged here).
            token = next(line for line in token.splitlines() if line and " " not in line)
            (bootstrap / identity).write_text(token + "\n")
            (bootstrap / identity).chmod(0o644)
        for name in (BACKBONE, AGGREGATOR):
            data = self.mounts(**{name: STATE})
            self.step(
                f"enroll {name} (enroll.sh)",
                self.container(
                    *data,
                    *scripts,
                    "-v",
                    f"{ca}:{CA_DIR}:ro",
                    "-v",
                    f"{bootstrap}:{BOOTSTRAP}:ro",
                    "--env",
                    f"SPLITFED_IDENTITY={name}",
                    "--env",
                    f"SPLITFED_TLS_DIR={STATE}/tls",
                    "--env",
                    f"SPLITFED_KEYMANAGER_ENROLL={KEYMANAGER}:7444",
                    "--entrypoint",
                    "/bin/sh",
                    image,
                    f"{SCRIPTS}/enroll.sh",
                ),
            )
        self.serve(
            BACKBONE,
            "splitfed-backbone",
            ["serve", "backbone", "--config", f"{CONFIG}/backbone.yaml"],
            *self.mounts(**{BACKBONE: STATE, "models_ro": "/models"}),
            *config,
        )
        self.serve(
            AGGREGATOR,
            "splitfed-aggregator",
            ["serve", "aggregator", "--config", f"{CONFIG}/aggregator.yaml"],
            *self.mounts(**{AGGREGATOR: STATE}),
            *config,
        )
        bundled = (
            self.step(
                "the bundled data's path",
                self.container(
                    "--entrypoint",
                    "python",
                    image,
                    "-c",
                    "from splitfed.models.tiny import BUNDLED_DATASET; print(BUNDLED_DATASET)",
                ),
            )
            .strip()
            .splitlines()[-1]
        )
        for client in CLIENTS:
            work = self.volume(client)
            (work / "client.toml").write_text(
                CLIENT_CONFIG.format(
                    backbone=BACKBONE,
                    aggregator=AGGREGATOR,
                    keymanager=KEYMANAGER,
                    data=bundled,
                )
            )
            (work / "client.toml").chmod(0o644)
            token = (bootstrap / client).read_text().strip()
            self.step(
                f"enroll {client}",
                self.container(
                    *self.mounts(**{client: "/work"}),
                    "-v",
                    f"{ca}:/ca:ro",
                    "--env",
                    f"SPLITFED_TOKEN={token}",  # as enroll.sh passes it: not in argv
                    image,
                    "keys",
                    "enroll",
                    "--keymanager",
                    f"{KEYMANAGER}:7444",
                    "--ca",
                    "/ca/ca.pem",
                    "--identity",
                    client,
                    "--out",
                    "/work/tls",
                ),
            )
        for name in (BACKBONE, AGGREGATOR):
            self.health(
                f"{name}:7443" if name == BACKBONE else f"{name}:7445",
                ["-v", f"{self.root / CLIENTS[0]}/tls:/tls:ro"],
                name,
            )
        # The federation: both members train at once (secure aggregation needs both).
        started = time.perf_counter()
        members = []
        for client in CLIENTS:
            members.append(f"{client}-train-{os.getpid()}")
            run(
                self.container(
                    *self.mounts(**{client: "/work", "models_ro": "/models"}),
                    "--workdir",
                    "/work",
                    image,
                    "train",
                    "--config",
                    "/work/client.toml",
                    detach=members[-1],
                )
            )
        for member in members:
            code = run([tool, "wait", member], timeout=1800).strip().splitlines()[-1]
            logs = run([tool, "logs", member], check=False)
            run([tool, "rm", "-f", member], check=False)
            if code != "0":
                raise StepError(f"{member} exited {code}:\n{logs[-4000:]}")
            if "federation finished at version 3 after 3 round(s)" not in logs:
                raise StepError(
                    f"{member} did not finish the dev federation's 3 rounds:\n{logs[-4000:]}"
                )
        self.timings.append(("federated training (both members)", time.perf_counter() - started))
        text = self.step(
            "generate (hospital-a)",
            self.container(
                *self.mounts(**{CLIENTS[0]: "/work", "models_ro": "/models"}),
                "--workdir",
                "/work",
                image,
                "generate",
                "--config",
                "/work/client.toml",
                "--prompt",
                "Which is larger, 7 or 3?",
            ),
        )
        print(text[-500:])
        # Each service's Prometheus endpoint, and a figure that shows the run happened.
        scrape = (
            "import json, sys, urllib.request\n"
            "from prometheus_client.parser import text_string_to_metric_families\n"
            "for target, (name, labels) in json.loads(sys.argv[1]).items():\n"
            "    text = urllib.request.urlopen(f'http://{target}/metrics', timeout=10).read()\n"
            "    samples = [s for f in text_string_to_metric_families(text.decode())\n"
            "               for s in f.samples if s.name == name]\n"
            "    found = sum(s.value for s in samples if labels.items() <= s.labels.items())\n"
            "    print(target, name, labels, found)\n"
            "    assert found > 0, (target, name, labels)\n"
        )
        self.step(
            "metrics scraped from each service",
            self.container(
                "--entrypoint",
                "python",
                image,
                "-c",
                scrape,
                json.dumps({f"{name}:9090": wanted for name, wanted in METRICS.items()}),
            ),
        )
        for name in reversed(self.services):
            self.step(f"stop {name}", [tool, "stop", "--time", "30", name])
            code = run([tool, "inspect", "--format", "{{.State.ExitCode}}", name]).strip()
            if code != "0":
                logs = run([tool, "logs", name], check=False)
                raise StepError(f"{name} exited {code} on SIGTERM:\n{logs[-4000:]}")

    def remove(self) -> None:
        for name in self.services:
            run([self.tool, "rm", "-f", name], check=False)
        run([self.tool, "network", "rm", "-f", self.network], check=False)


def deploy(args: argparse.Namespace) -> int:
    tool = engine()
    if not has_image(tool, args.image):
        raise StepError(f"no image {args.image}: run `make images` first")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="splitfed-deploy-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        deployment = Deployment(tool, args.image, root)
        run([tool, "network", "create", deployment.network])
        try:
            deployment.run_all()
        finally:
            deployment.remove()
    print(f"\nthe deployment in containers passed in {time.perf_counter() - started:.0f} s:")
    for what, seconds in deployment.timings:
        print(f"  {seconds:7.1f} s  {what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    building = commands.add_parser("build", help="build the images")
    building.add_argument("--cuda", action="store_true", help="also the CUDA Dockerfile")
    building.add_argument("--python-image", help="the base image (default: detected)")
    testing = commands.add_parser("test", help="smoke-test the CPU image")
    testing.add_argument("--image", default=CPU_IMAGE)
    deploying = commands.add_parser("deploy", help="the whole deployment in containers")
    deploying.add_argument("--image", default=CPU_IMAGE)
    args = parser.parse_args(argv)
    commands_of = {"build": build, "test": smoke, "deploy": deploy}
    try:
        return commands_of[args.command](args)
    except (StepError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
