"""Every kind of splitfed config file, loaded and validated in one place.

A file's sections say what it configures: ``[keymanager]`` a key manager, ``[aggregator]``
an aggregator, ``[training]`` a client (training, generation, evaluation, chat), and
``[backbone]`` with a ``model_path`` a backbone service. ``splitfed config validate`` and every
``--config`` option go through :func:`load`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from splitfed.config import build, read_config, section
from splitfed.failures import is_ip_address
from splitfed.services.backbone.settings import BackboneSettings, server_workers
from splitfed.services.diagnostics.settings import DiagnosticsSettings
from splitfed.services.keymanager.settings import KeyManagerSettings
from splitfed.serving import EndpointSettings, SecuritySettings, ServerSettings

if TYPE_CHECKING:
    from splitfed.clients.app import ClientConfig
    from splitfed.services.aggregator.settings import AggregatorSettings


@dataclass(frozen=True, kw_only=True)
class ServedConfig:
    """The sections of a service that clients call: [server], [security], [diagnostics]."""

    server: ServerSettings
    security: SecuritySettings
    diagnostics: DiagnosticsSettings

    @staticmethod
    def sections(config: Mapping[str, Any]) -> dict[str, Any]:
        """The three sections of ``config``, built (absent: the defaults)."""
        return {
            "server": build(ServerSettings, section(config, "server", required=False), "server"),
            "security": build(
                SecuritySettings, section(config, "security", required=False), "security"
            ),
            "diagnostics": build(
                DiagnosticsSettings, section(config, "diagnostics", required=False), "diagnostics"
            ),
        }


@dataclass(frozen=True, kw_only=True)
class BackboneConfig(ServedConfig):
    backbone: BackboneSettings
    # [server] max_workers as the file set it (None: derived, see server_workers).
    server_max_workers: int | None = None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> BackboneConfig:
        _only(config, {"backbone", "server", "security", "diagnostics"}, "backbone")
        sections = cls.sections(config)
        loaded = cls(
            backbone=build(BackboneSettings, section(config, "backbone"), "backbone"),
            server_max_workers=(
                sections["server"].max_workers
                if "max_workers" in section(config, "server", required=False)
                else None
            ),
            **sections,
        )
        server_workers(loaded)  # the streams fit the worker threads
        return loaded


@dataclass(frozen=True)
class KeyManagerConfig:
    keymanager: KeyManagerSettings
    server: ServerSettings

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> KeyManagerConfig:
        _only(config, {"keymanager", "server"}, "key manager")
        return cls(
            build(KeyManagerSettings, section(config, "keymanager"), "keymanager"),
            build(ServerSettings, section(config, "server", required=False), "server"),
        )


# The aggregator's settings and the client's config import transformers (seconds): they
# are imported for those kinds only, so that a key manager or backbone does not wait.


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig(ServedConfig):
    aggregator: AggregatorSettings

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> AggregatorConfig:
        from splitfed.services.aggregator.settings import AggregatorSettings, stream_slots

        _only(config, {"aggregator", "server", "security", "diagnostics"}, "aggregator")
        loaded = cls(
            aggregator=build(AggregatorSettings, section(config, "aggregator"), "aggregator"),
            **cls.sections(config),
        )
        stream_slots(loaded.server.max_workers, loaded.diagnostics.max_streams)  # they fit
        return loaded


def _client(config: Mapping[str, Any]) -> ClientConfig:
    from splitfed.clients.app import ClientConfig

    return ClientConfig.from_mapping(config)


Config: TypeAlias = "BackboneConfig | KeyManagerConfig | AggregatorConfig | ClientConfig"
ServiceConfig = TypeVar("ServiceConfig", BackboneConfig, KeyManagerConfig, AggregatorConfig)

KINDS: dict[str, Callable[[Mapping[str, Any]], Config]] = {
    "client": _client,
    "backbone": BackboneConfig.from_mapping,
    "keymanager": KeyManagerConfig.from_mapping,
    "aggregator": AggregatorConfig.from_mapping,
}


def _only(config: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"a {what} config has no [{unknown[0]}] section; "
            f"its sections are {', '.join(f'[{s}]' for s in sorted(allowed))}"
        )


def detect_kind(config: Mapping[str, Any]) -> str:
    """Which kind of config ``config`` is, from its sections."""
    if "keymanager" in config:
        return "keymanager"
    if "aggregator" in config:
        return "aggregator"
    if "training" in config:
        return "client"
    backbone = config.get("backbone")
    if isinstance(backbone, dict) and "model_path" in backbone:
        return "backbone"
    if isinstance(backbone, dict) and "address" in backbone:
        return "client"
    raise ValueError(
        "cannot tell what this config is for: give a [keymanager], [aggregator], "
        "[training] (a client) or [backbone] with a model_path (a backbone service) "
        "section, or name the kind with --kind"
    )


def load(path: Path, kind: str | None = None) -> tuple[str, Config]:
    """``(kind, config)`` of the file at ``path``, validated (``kind``: detect it)."""
    data = read_config(path)
    if kind is None:
        kind = detect_kind(data)
    elif kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; choose from {', '.join(KINDS)}")
    return kind, KINDS[kind](data)


def load_as(path: Path, kind: type[ServiceConfig]) -> ServiceConfig:
    """The file at ``path`` as a ``kind`` config, validated."""
    return kind.from_mapping(read_config(path))


def check_files(config: Config) -> None:
    """Raise ``ValueError`` naming the field if a file ``config`` reads is missing or
    unreadable (TLS material, model, data); what a service or client would write is
    not checked."""
    inputs: list[tuple[str, Path | None]] = []
    tls_sections: list[tuple[str, EndpointSettings]] = []
    if isinstance(config, KeyManagerConfig):
        _check_keymanager_tls(config)
    elif isinstance(config, BackboneConfig | AggregatorConfig):
        tls_sections.append(("[server]", config.server))
    else:  # a client
        inputs += [
            ("[training] data", config.training.data),
            ("[training] model_path", config.training.model_path),
            ("[training] eval_data", config.training.eval_data),
        ]
        tls_sections.append(("[backbone]", config.backbone))
    if isinstance(config, BackboneConfig):
        inputs.append(("[backbone] model_path", config.backbone.model_path))
    if isinstance(config, AggregatorConfig):
        for index, federation in enumerate(config.aggregator.federations):
            if federation.schema_file is not None:
                try:
                    federation.tensor_schema()
                except ValueError as exc:
                    raise ValueError(f"[aggregator] federations[{index}] {exc}") from None
    for where, path in inputs:
        if path is not None and not Path(path).exists():
            raise ValueError(f"{where}: {path} does not exist")
    for where, settings in tls_sections:
        if settings.insecure:
            continue
        try:
            settings.tls().verify_own_certificate()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{where} TLS material: {exc}; set tls_dir (ca.pem, cert.pem, key.pem) "
                "or ca, cert and key"
            ) from None


def _check_keymanager_tls(config: KeyManagerConfig) -> None:
    """The key manager's TLS material as ``serve keymanager`` loads it: [server], else the
    certificate `keys init` wrote to ``state_dir/server``. Its expiry is not checked:
    the key manager renews its own certificate as it starts."""
    from splitfed.services.keymanager.server import server_tls

    try:
        server_tls(config.keymanager, config.server)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"[server] TLS material: {exc}; without tls_dir (or ca, cert and key) the key "
            f"manager uses {config.keymanager.state_dir / 'server'}, which `splitfed keys "
            "init` writes"
        ) from None


def name_warnings(config: Config, server_certs: Sequence[Path] = ()) -> list[str]:
    """Where a client's server names cannot match the servers' certificates, as far as
    can be known without connecting: an address that is an IP literal without
    server_name (the certificate then needs that IP, `--ip`), and, for each certificate
    in ``server_certs``, the section of its role (backbone, aggregator, key manager)
    whose name it does not carry."""
    if isinstance(config, BackboneConfig | KeyManagerConfig | AggregatorConfig):
        return []
    targets = [("[backbone]", "backbone", config.backbone.address, config.backbone.server_name)]
    if config.federated is not None:
        federated = config.federated
        targets.append(("[federated]", "aggregator", federated.aggregator, federated.server_name))
    if config.security.keymanager:
        security = config.security
        targets.append(
            ("[security]", "keymanager", security.keymanager, security.keymanager_server_name)
        )
    certificates = [(path, *_certificate_names(path)) for path in server_certs]
    warnings = []
    for where, role, address, server_name in targets:
        host = address.rpartition(":")[0].strip("[]")
        expected = server_name or host
        if server_name is None and is_ip_address(host):
            warnings.append(
                f"{where} {address} is an IP address and no server_name is set: the "
                f"{role}'s certificate must carry IP {host} (a token made with `--ip "
                f"{host}`), or set server_name to a DNS name it carries"
            )
        for path, cert_role, names in certificates:
            if cert_role == role and expected not in names:
                key = "keymanager_server_name" if role == "keymanager" else "server_name"
                warnings.append(
                    f"{where} expects the name {expected!r} but the {role} certificate "
                    f"{path} carries {', '.join(names) or 'no names'}: set {key} to one of "
                    f"them, or enroll the {role} again with `--dns {expected}` (or `--ip`)"
                )
    return warnings


def _certificate_names(path: Path) -> tuple[str, list[str]]:
    """(role, DNS names and IP addresses) of the certificate in ``path``."""
    from cryptography import x509

    from splitfed.security.identity import identity_from_uri

    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ValueError(
            f"--server-cert {path}: not a readable server certificate ({exc})"
        ) from None
    identities = [
        identity_from_uri(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)
    ]
    role = next((i.role for i in identities if i is not None), "")
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return role, [*san.get_values_for_type(x509.DNSName), *ips]
