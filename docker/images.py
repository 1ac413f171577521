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

``build`` builds ``localhost/splitfed:<version>-cpu`` from docker/Dockerfile.cpu and, with
``--cuda``, docker/Dockerfile.cuda structurally on the same base
(``localhost/splitfed:<version>-cuda-structure``: its steps, users and layout, not the
CUDA libraries). ``test`` runs the CPU image read-only, without capabilities, as uid
10001 with a tmpfs /tmp: its CLI, ``keys init`` into a volume, ``serve diagnostics``
over mTLS answered by ``splitfed health`` from another container, the image's
HEALTHCHECK, and a clean exit on SIGTERM. Each step prints what it ran and how long it
took; any failure exits 1 with the engine's output.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

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
    print("$ " + " ".join(args), flush=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    building = commands.add_parser("build", help="build the images")
    building.add_argument("--cuda", action="store_true", help="also the CUDA Dockerfile")
    building.add_argument("--python-image", help="the base image (default: detected)")
    testing = commands.add_parser("test", help="smoke-test the CPU image")
    testing.add_argument("--image", default=CPU_IMAGE)
    args = parser.parse_args(argv)
    try:
        return build(args) if args.command == "build" else smoke(args)
    except (StepError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
