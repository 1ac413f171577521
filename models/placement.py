"""Placing a body on several GPUs of one node (Accelerate ``device_map``), so that a
70B-class body fits one multi-GPU pod. Blocks are never split across devices."""

from __future__ import annotations

from collections.abc import Mapping

from accelerate import dispatch_model, infer_auto_device_map

from splitfed.models.parts import SplitPart

Device = int | str


def body_device_map(part: SplitPart, max_memory: Mapping[Device, int | str]) -> dict[str, Device]:
    """Which device each of the part's modules goes to, filling devices in order up to
    ``max_memory`` (bytes or strings like ``"20GiB"``, keys are GPU indices or ``"cpu"``)."""
    block = type(part.blocks[0]).__name__
    device_map = infer_auto_device_map(
        part.base, max_memory=dict(max_memory), no_split_module_classes=[block]
    )
    return {f"base.{name}" if name else "base": device for name, device in device_map.items()}


def place_part(part: SplitPart, device_map: Mapping[str, Device]) -> SplitPart:
    """Move the part's modules as ``device_map`` says; activations follow through hooks."""
    base_map = {}
    for name, device in device_map.items():
        if name != "base" and not name.startswith("base."):
            raise ValueError(f"device map entry {name!r} is not inside the part's base model")
        base_map[name.removeprefix("base").removeprefix(".")] = device
    dispatch_model(part.base, device_map=base_map)
    return part
