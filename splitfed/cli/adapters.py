"""``splitfed adapters export | inspect | schema``: trained adapters out of the split.

The client and the model modules import torch: the commands import them inside (see
splitfed/cli/__init__.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from splitfed.cli.options import (
    config_option,
    config_overrides,
    dir_option,
    fail,
    file_option,
    force_option,
    quiet_libraries,
    refuse_overwrite,
)
from splitfed.errors import SplitfedError


@click.group()
def adapters() -> None:
    """Export trained adapters for the whole model, or inspect adapter files."""


@adapters.command("export")
@config_option("The client config used for training (its checkpoint_dir holds the adapter).")
@dir_option("--output", required=True, help="Directory to write the adapter to.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "safetensors"]),
    default="peft",
    show_default=True,
    help="peft: adapter_config.json + adapter_model.safetensors for PeftModel; "
    "safetensors: the tensors under the checkpoint's names.",
)
@click.option(
    "--no-body",
    is_flag=True,
    help="Leave out the body's adapter (do not contact the backbone).",
)
@dir_option(
    "--merged",
    default=None,
    help="Also write a full checkpoint with the adapter merged into the weights.",
)
@force_option("what --output and --merged name")
@config_overrides
@click.pass_context
@quiet_libraries
def export(
    ctx: click.Context,
    config_path: Path,
    output: Path,
    fmt: str,
    no_body: bool,
    merged: Path | None,
    force: bool,
) -> None:
    """Put the head's and tail's adapter (from the training checkpoint) and the body's
    (from the backbone session the checkpoint names) together as one adapter of the
    unsplit model."""
    from splitfed.clients.app import ClientConfig, backbone_client, keymanager_for
    from splitfed.clients.backbone import client_crypto
    from splitfed.models.adapters import load_adapter, save_adapter
    from splitfed.models.export import merge_into_checkpoint, write_peft
    from splitfed.models.identity import TrainedAgainst, merge_warning

    try:
        config = ClientConfig.load(config_path)
        checkpoint = config.training.checkpoint_dir
        if checkpoint is None or not (checkpoint / "client.json").is_file():
            raise ValueError(
                f"[training] checkpoint_dir ({checkpoint}) holds no trained adapter; "
                "run splitfed train with a checkpoint_dir first"
            )
        if merged is not None and fmt != "peft":
            raise ValueError("--merged needs --format peft")
        refuse_overwrite(output, "--output", force)
        refuse_overwrite(merged, "--merged", force)
        state = json.loads((checkpoint / "client.json").read_text())
        tensors = load_adapter(checkpoint / "adapter.safetensors")
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    try:
        if not no_body:
            with backbone_client(config.backbone) as client, keymanager_for(config) as keys:
                # An encrypted session's adapter comes sealed with the session's keys.
                crypto = None
                if config.training.encrypted:
                    if keys is None:
                        raise ValueError(
                            "the session is encrypted: its adapter needs the key manager "
                            "([security] keymanager)"
                        )
                    crypto = client_crypto(keys, state["session_id"])
                body = client.export_adapter(state["session_id"], crypto)
            overlap = sorted(set(body) & set(tensors))
            if overlap:
                raise ValueError(f"the body's adapter repeats a client tensor: {overlap[0]}")
            tensors.update(body)
        metadata = {
            "session_id": state["session_id"],
            "step": state.get("step"),
            "body": not no_body,
            "model_path": str(config.training.model_path),
            "adapter": config.adapter.to_dict(),
        }
        # What it was trained against (a checkpoint from before quantization: not said).
        trained = TrainedAgainst.from_metadata(state)
        identity = trained.metadata() if trained is not None else {}
        metadata.update(identity)
        if fmt == "peft":
            write_peft(
                output, tensors, config.adapter, config.training.model_path, metadata=metadata
            )
        else:
            save_adapter(
                output / "adapter.safetensors",
                tensors,
                metadata={"splitfed": json.dumps(metadata), **identity},
            )
        if merged is not None:
            merge_into_checkpoint(config.training.model_path, output, merged)
            if trained is not None and merge_warning(trained.body):
                click.echo(f"warning: {merge_warning(trained.body)}", err=True)
    except (ValueError, RuntimeError, OSError, SplitfedError) as exc:
        fail(ctx, exc, usage=False)
        return
    parameters = sum(t.numel() for t in tensors.values())
    click.echo(
        f"wrote {len(tensors)} tensors ({parameters:,} parameters, step {state.get('step')}, "
        f"{'with' if not no_body else 'without'} the body) to {output}"
        + (f"; merged checkpoint in {merged}" if merged else "")
    )


def _adapter_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("adapter_model.safetensors", "adapter.safetensors"):
        if (path / name).is_file():
            return path / name
    raise ValueError(
        f"{path}: no adapter here; give a .safetensors file, a PEFT adapter directory or "
        "a training checkpoint_dir"
    )


_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")
# models/quantization.py QUANTIZATIONS (not imported here: it imports torch).
_QUANTIZATIONS = ("none", "int8", "nf4")


def _trained_against(file: Path, metadata: dict[str, str]) -> dict[str, str] | None:
    """What the adapter was trained against (body and client parts' quantization): from
    the file's metadata, else from ``splitfed.json`` (a PEFT export) or ``client.json`` (a
    training checkpoint) beside it; ``None`` where nothing says."""
    from splitfed.models.identity import TrainedAgainst

    found = TrainedAgainst.from_metadata(metadata)
    for name in ("splitfed.json", "client.json"):
        side = file.parent / name
        if found is None and side.is_file():
            try:
                values = json.loads(side.read_text())
            except ValueError:
                continue
            if isinstance(values, dict):
                found = TrainedAgainst.from_metadata(values)
    return None if found is None else {"body": found.body, "parts": found.parts}


def summarise(path: Path) -> dict[str, Any]:
    """What an adapter file holds: tensors, parameters, layers, modules, norms."""
    file = _adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in sorted(handle.keys())}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None
    rows = [
        {
            "name": name,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "norm": float(tensor.float().norm()),
            "max_abs": float(tensor.float().abs().max()) if tensor.numel() else 0.0,
            "numel": tensor.numel(),
            "bytes": tensor.numel() * tensor.element_size(),
        }
        for name, tensor in tensors.items()
    ]
    layers = sorted({int(m.group(1)) for r in rows if (m := _LAYER.search(r["name"]))})
    modules = sorted(
        {r["name"].split(".lora_")[0].rsplit(".", 1)[-1] for r in rows if ".lora_" in r["name"]}
    )
    config_file = file.parent / "adapter_config.json"
    return {
        "file": str(file),
        "tensors": len(rows),
        "parameters": sum(r["numel"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
        "dtypes": sorted({r["dtype"] for r in rows}),
        "layers": layers,
        "modules": modules,
        "metadata": metadata,
        "quantization": _trained_against(file, metadata),
        "peft_config": json.loads(config_file.read_text()) if config_file.is_file() else None,
        "rows": rows,
    }


@adapters.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@click.option(
    "--against",
    type=click.Choice(_QUANTIZATIONS),
    default=None,
    help="The body quantization the adapter is to be used with: warn if it was trained "
    "against another.",
)
@file_option("--json", "json_path", help="Also write the summary as JSON.")
@click.pass_context
def inspect(
    ctx: click.Context,
    path: Path,
    show_tensors: bool,
    against: str | None,
    json_path: Path | None,
) -> None:
    """Summarise an adapter: a .safetensors file, a PEFT directory or a checkpoint_dir.
    With the quantization it was trained against where it records it (body and client
    parts): an adapter of a quantized body differs from one of the full-precision model."""
    try:
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        summary = summarise(path)
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    console = Console()
    table = Table(title=summary["file"], show_header=False)
    table.add_row("tensors", str(summary["tensors"]))
    table.add_row("parameters", f"{summary['parameters']:,}")
    table.add_row("bytes", f"{summary['bytes']:,}")
    table.add_row("dtypes", ", ".join(summary["dtypes"]))
    table.add_row("layers", ", ".join(map(str, summary["layers"])) or "-")
    table.add_row("modules", ", ".join(summary["modules"]) or "-")
    peft = summary["peft_config"]
    if peft:
        table.add_row(
            "peft", f"{peft.get('peft_type')} r={peft.get('r')} alpha={peft.get('lora_alpha')}"
        )
    trained = summary["quantization"]
    if trained is not None:
        table.add_row("quantization", f"body {trained['body']}, client parts {trained['parts']}")
    for key, value in summary["metadata"].items():
        table.add_row(f"meta {key}", str(value)[:120])
    console.print(table)
    for warning in _quantization_warnings(trained, against):
        click.echo(f"warning: {warning}", err=True)
    if show_tensors:
        rows = Table("tensor", "shape", "dtype", "norm", "max |x|")
        for row in summary["rows"]:
            rows.add_row(
                row["name"],
                "x".join(map(str, row["shape"])),
                row["dtype"],
                f"{row['norm']:.4g}",
                f"{row['max_abs']:.4g}",
            )
        console.print(rows)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")


def _quantization_warnings(trained: dict[str, str] | None, against: str | None) -> list[str]:
    """``inspect``'s warnings about the quantization the adapter was trained against."""
    from splitfed.models.identity import body_mismatch, merge_warning

    if trained is None:
        if against is None:
            return []
        return [
            "the adapter does not record the body quantization it was trained against "
            "(written before splitfed recorded it); it cannot be compared with --against"
        ]
    warnings = [merge_warning(trained["body"])]
    if against is not None:
        warnings.append(body_mismatch(trained["body"], against, where="--against names"))
    return [warning for warning in warnings if warning]


@adapters.command("schema")
@config_option("A client config: its model_path (config.json only), [adapter], k and m.")
@file_option("--out", default=None, help="Write the schema JSON here (default: print it).")
@config_overrides
@click.pass_context
def schema(ctx: click.Context, config_path: Path, out: Path | None) -> None:
    """The schema (tensor names and shapes) of a client's federated adapter: what a
    federation's schema_file holds. Needs only the model's config.json, no weights."""
    from splitfed.clients.app import ClientConfig
    from splitfed.models.schema import adapter_schema, schema_digest, schema_json, write_schema

    try:
        config = ClientConfig.load(config_path)
        training = config.training
        found = adapter_schema(training.model_path, config.adapter, training.k, training.m)
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    if out is None:
        click.echo(json.dumps(schema_json(found), indent=1))
        return
    write_schema(out, found)
    click.echo(f"wrote {out}: {len(found)} tensors, schema digest {schema_digest(found)}")
