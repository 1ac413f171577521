"""Every kind of splitfed config file, loaded and validated in one place.

A file's sections say what it configures: ``[keymanager]`` a key manager, ``[aggregator]``
an aggregator, ``[training]`` a client (training, generation, evaluation, chat), and
``[backbone]`` with a ``model_path`` a backbone service. ``splitfed config validate`` and every
``--config`` option go through :func:`load`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.config import build, read_config, section


@dataclass(frozen=True)
class BackboneConfig:
    backbone: Any  # BackboneSettings
    server: Any  # ServerSettings
    security: Any  # SecuritySettings
    diagnostics: Any = None  # DiagnosticsSettings
    # [server] max_workers as the file set it (None: derived, see server_workers).
    server_max_workers: int | None = None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> BackboneConfig:
        from splitfed.services.backbone.settings import BackboneSettings, server_workers
        from splitfed.services.diagnostics.settings import DiagnosticsSettings
        from splitfed.serving import SecuritySettings, ServerSettings

        _only(config, {"backbone", "server", "security", "diagnostics"}, "backbone")
        server_section = section(config, "server", required=False)
        server = build(ServerSettings, server_section, "server")
        loaded = cls(
            build(BackboneSettings, section(config, "backbone"), "backbone"),
            server,
            build(SecuritySettings, section(config, "security", required=False), "security"),
            build(
                DiagnosticsSettings, section(config, "diagnostics", required=False), "diagnostics"
            ),
            server.max_workers if "max_workers" in server_section else None,
        )
        server_workers(loaded)  # the streams fit the worker threads
        return loaded


@dataclass(frozen=True)
class KeyManagerConfig:
    keymanager: Any  # KeyManagerSettings
    server: Any  # ServerSettings

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> KeyManagerConfig:
        from splitfed.services.keymanager.settings import KeyManagerSettings
        from splitfed.serving import ServerSettings

        _only(config, {"keymanager", "server"}, "key manager")
        return cls(
            build(KeyManagerSettings, section(config, "keymanager"), "keymanager"),
            build(ServerSettings, section(config, "server", required=False), "server"),
        )


@dataclass(frozen=True)
class AggregatorConfig:
    aggregator: Any  # AggregatorSettings
    server: Any  # ServerSettings
    security: Any  # SecuritySettings
    diagnostics: Any = None  # DiagnosticsSettings

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> AggregatorConfig:
        from splitfed.services.aggregator.settings import AggregatorSettings, stream_slots
        from splitfed.services.diagnostics.settings import DiagnosticsSettings
        from splitfed.serving import SecuritySettings, ServerSettings

        _only(config, {"aggregator", "server", "security", "diagnostics"}, "aggregator")
        loaded = cls(
            build(AggregatorSettings, section(config, "aggregator"), "aggregator"),
            build(ServerSettings, section(config, "server", required=False), "server"),
            build(SecuritySettings, section(config, "security", required=False), "security"),
            build(
                DiagnosticsSettings, section(config, "diagnostics", required=False), "diagnostics"
            ),
        )
        stream_slots(loaded.server.max_workers, loaded.diagnostics.max_streams)  # they fit
        return loaded


def _client(config: Mapping[str, Any]) -> Any:
    from splitfed.clients.app import ClientConfig

    return ClientConfig.from_mapping(config)


KINDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
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


def load(path: Path, kind: str | None = None) -> tuple[str, Any]:
    """``(kind, config)`` of the file at ``path``, validated (``kind``: detect it)."""
    data = read_config(path)
    if kind is None:
        kind = detect_kind(data)
    elif kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; choose from {', '.join(KINDS)}")
    return kind, KINDS[kind](data)


def load_as(path: Path, kind: str) -> Any:
    return load(path, kind)[1]


def check_files(kind: str, config: Any) -> None:
    """Raise ``ValueError`` naming the field if a file ``config`` reads is missing or
    unreadable (TLS material, model, data); what a service or client would write is
    not checked."""
    inputs: list[tuple[str, Path | None]] = []
    tls_sections: list[tuple[str, Any]] = []
    if kind == "client":
        inputs += [
            ("[training] data", config.training.data),
            ("[training] model_path", config.training.model_path),
            ("[training] eval_data", config.training.eval_data),
        ]
        tls_sections.append(("[backbone]", config.backbone))
    else:
        tls_sections.append(("[server]", config.server))
    if kind == "backbone":
        inputs.append(("[backbone] model_path", config.backbone.model_path))
    if kind == "aggregator":
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
        if getattr(settings, "insecure", False):
            continue
        try:
            settings.tls().verify_own_certificate()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{where} TLS material: {exc}; set tls_dir (ca.pem, cert.pem, key.pem) "
                "or ca, cert and key"
            ) from None
