"""The services the fuzzer attacks: each a real process on 127.0.0.1 (port 0), over mTLS
with certificates from one :class:`CertificateAuthority`.

Each service's configuration lives in one place below (``KEYMANAGER``,
``BACKBONE_SETTINGS``, ``FEDERATIONS``, ``DIAGNOSTICS``, and ``SERVER`` for all), so that
a change to a service's settings (quotas, membership, caps) is a change to one mapping.

Once a service serves, its address space is capped (``RLIMIT_AS`` at what it maps then plus
``ADDRESS_SPACE_HEADROOM``): a case that makes a service allocate without bound fails
inside that service (and is reported) instead of exhausting a shared machine.
"""

from __future__ import annotations

import json
import os
import re
import resource
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbone_kit import SERVER_NAME as BACKBONE_NAME
from backbone_kit import deployment
from federated_kit import AGGREGATOR_NAME

from splitfed.cli.launcher import ServiceProcess
from splitfed.security.ca import CertificateAuthority
from splitfed.services.keymanager.authority import init_authority
from splitfed.tls import TLSConfig
from splitfed.wire import GiB, KiB, MiB

KEYMANAGER_NAME = "localhost"
DIAGNOSTICS_NAME = "diagnostics.splitfed.local"
KEK = "fuzz-key-encryption-key-0123456789"
# What every service takes per message: a chunk and its frame fields (transport.py).
CHUNK_BYTES = 64 * KiB
# Virtual memory a service may map beyond what it maps once it serves.
ADDRESS_SPACE_HEADROOM = 3 * GiB

# --- identities ----------------------------------------------------------------------
# Members of the federations; "fuzz-a" owns the backbone sessions the cases target.
MEMBERS = ("fuzz-a", "fuzz-b", "fuzz-c")
# A client of the deployment that is a member of nothing and owns the "foreign" session.
OUTSIDER = "outsider"
AGGREGATOR = "aggregator-0"
ADMIN = "admin-fuzz"
IDENTITIES: dict[str, str] = {
    **dict.fromkeys(MEMBERS, "client"),
    OUTSIDER: "client",
    AGGREGATOR: "aggregator",
    ADMIN: "admin",
    # A second backbone identity: may call the key manager's backbone RPCs.
    "backbone-fuzz": "backbone",
}

# --- one place per service's configuration -------------------------------------------
KEYMANAGER: dict[str, Any] = {"certificate_validity_s": 3600.0}
BACKBONE_SETTINGS: dict[str, Any] = {
    "max_batch_size": 4,
    "max_sequence_length": 64,
    "max_sessions": 32,
    "max_streams": 8,
    "max_cache_bytes": 16 * MiB,
    "idle_timeout_s": 3600.0,
    "aggregators": [AGGREGATOR],
}
BACKBONE_MODEL: dict[str, int] = {"layers": 3, "hidden_size": 32}
# Federations: started by MEMBERS joining (start_clients), never finished (rounds 0), no
# deadline within a run; members and schema below.
FEDERATIONS: list[dict[str, Any]] = [
    {
        "name": "fuzz",
        "rounds": 0,
        "min_clients": 2,
        "start_clients": len(MEMBERS),
        "local_steps": 1,
        "deadline_s": 86400.0,
        "adapter_seed": 7,
        "max_adapter_bytes": 1 * MiB,
    },
    {
        "name": "fuzz-secure",
        "rounds": 0,
        "min_clients": 2,
        "start_clients": len(MEMBERS),
        "local_steps": 1,
        "deadline_s": 86400.0,
        "adapter_seed": 7,
        "secure_aggregation": True,
        "max_adapter_bytes": 1 * MiB,
    },
]
# The federations' adapter schema: the members' honest updates hold these tensors.
UPDATE_SCHEMA = [("layers.0.lora_A", [2, 4]), ("layers.0.lora_B", [4, 2])]
for _federation in FEDERATIONS:
    _federation["members"] = list(MEMBERS)
    _federation["schema"] = dict(UPDATE_SCHEMA)
# `splitfed serve diagnostics` options: a link check's limits.
DIAGNOSTICS: list[str] = [
    *("--chunk-bytes", str(CHUNK_BYTES), "--grace", "1"),
    *("--max-tensor-bytes", str(4 * MiB), "--max-buffered-bytes", str(16 * MiB)),
]
# The [server] section of every service but diagnostics (which takes options).
SERVER: dict[str, Any] = {"chunk_bytes": CHUNK_BYTES, "grace_s": 1.0}


def cap_address_space(pid: int, headroom: int = ADDRESS_SPACE_HEADROOM) -> int:
    """Cap ``pid``'s address space at what it maps now plus ``headroom``; the cap."""
    status = Path(f"/proc/{pid}/status").read_text()
    mapped = re.search(r"^VmSize:\s+(\d+) kB", status, re.M)
    assert mapped is not None, f"no VmSize for process {pid}"
    cap = int(mapped.group(1)) * KiB + headroom
    resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))
    return cap


@dataclass
class Host:
    """One service process the cases go to."""

    name: str
    address: str
    server_name: str
    process: ServiceProcess
    # Where the enrollment port is (the key manager only).
    extra: dict[str, str] = field(default_factory=dict)
    # RLIMIT_AS set once it served (bytes).
    address_space: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Deployment:
    root: Path
    ca: CertificateAuthority
    hosts: dict[str, Host]
    tls: dict[str, TLSConfig]

    def stop(self) -> None:
        """Stop every service at once (each gets SIGTERM, then its grace period)."""
        with ThreadPoolExecutor(len(self.hosts) or 1) as pool:
            list(pool.map(lambda host: host.process.stop(), self.hosts.values()))


def _tls(ca: CertificateAuthority, identity: str, role: str) -> TLSConfig:
    issued = ca.issue(identity, role)
    assert issued.key_pem is not None
    return TLSConfig(ca.cert_pem, issued.cert_pem, issued.key_pem)


def _yaml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"{name}:")
        lines += [
            f"  {k}: {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in values.items()
        ]
    return "\n".join(lines) + "\n"


def _keymanager(root: Path, ca: CertificateAuthority, env: dict[str, str]) -> ServiceProcess:
    """The key manager, over the CA above (imported); its server certificate names
    localhost."""
    init_authority(root / "km", KEK.encode(), ca=ca)
    config = root / "keymanager.yaml"
    config.write_text(
        _yaml({"keymanager": {"state_dir": root / "km", **KEYMANAGER}, "server": SERVER})
    )
    args = ["serve", "keymanager", "--config", str(config)]
    return ServiceProcess("keymanager", args, log_path=root / "keymanager.log", env=env)


def _aggregator(root: Path, ca: CertificateAuthority, env: dict[str, str]) -> ServiceProcess:
    ca.issue(AGGREGATOR, "aggregator", dns_names=[AGGREGATOR_NAME]).write(root / "aggregator-tls")
    config = root / "aggregator.yaml"
    config.write_text(
        "aggregator:\n"
        f"  state_dir: {json.dumps(str(root / 'aggregator-state'))}\n"
        f"  federations: {json.dumps(FEDERATIONS)}\n"
        + _yaml({"server": {"tls_dir": root / "aggregator-tls", **SERVER}})
    )
    args = ["serve", "aggregator", "--config", str(config)]
    return ServiceProcess("aggregator", args, log_path=root / "aggregator.log", env=env)


def _diagnostics(root: Path, ca: CertificateAuthority, env: dict[str, str]) -> ServiceProcess:
    ca.issue("diagnostics-0", "backbone", dns_names=[DIAGNOSTICS_NAME]).write(root / "diag-tls")
    args = ["serve", "diagnostics", "--tls-dir", str(root / "diag-tls"), *DIAGNOSTICS]
    return ServiceProcess("diagnostics", args, log_path=root / "diagnostics.log", env=env)


def _backbone(
    root: Path, ca: CertificateAuthority, env: dict[str, str], keymanager: str
) -> ServiceProcess:
    """The backbone, with the key manager for activation encryption."""
    dep = deployment(
        root / "backbone",
        ca=ca,
        security={"keymanager": keymanager, "keymanager_server_name": KEYMANAGER_NAME},
        server=SERVER,
        **BACKBONE_MODEL,
        **BACKBONE_SETTINGS,
    )
    args = ["serve", "backbone", "--config", str(dep.config_path)]
    return ServiceProcess("backbone", args, log_path=root / "backbone.log", env=env)


def start(root: Path) -> Deployment:
    """Mint the PKI and start the four services, in parallel but for the backbone, which
    needs the key manager's address; stops what started if one fails."""
    ca = CertificateAuthority.create("fuzz CA")
    env = {**os.environ, "SPLITFED_KEK": KEK, "OMP_NUM_THREADS": "1"}
    processes = {
        "keymanager": _keymanager(root, ca, env),
        "aggregator": _aggregator(root, ca, env),
        "diagnostics": _diagnostics(root, ca, env),
    }
    try:
        with ThreadPoolExecutor(len(processes) + 1) as pool:
            starting = {n: pool.submit(p.start, timeout_s=180) for n, p in processes.items()}
            keymanager = starting["keymanager"].result()
            processes["backbone"] = _backbone(root, ca, env, keymanager)
            starting["backbone"] = pool.submit(processes["backbone"].start, timeout_s=180)
            addresses = {name: future.result() for name, future in starting.items()}
    except BaseException:
        for process in processes.values():
            process.stop()
        raise
    enroll = next(
        line.split()[-1]
        for line in processes["keymanager"].preamble
        if line.startswith("enrollment on")
    )
    names = {
        "keymanager": KEYMANAGER_NAME,
        "backbone": BACKBONE_NAME,
        "aggregator": AGGREGATOR_NAME,
        "diagnostics": DIAGNOSTICS_NAME,
    }
    hosts = {
        name: Host(name, addresses[name], names[name], process)
        for name, process in processes.items()
    }
    hosts["keymanager"].extra["enroll"] = enroll
    for host in hosts.values():
        host.address_space = cap_address_space(host.pid)
    tls = {identity: _tls(ca, identity, role) for identity, role in IDENTITIES.items()}
    return Deployment(root, ca, hosts, tls)


@contextmanager
def running(root: Path) -> Iterator[Deployment]:
    dep = start(root)
    try:
        yield dep
    finally:
        dep.stop()
