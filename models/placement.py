"""Placing a body on several GPUs of one node (Accelerate ``device_map``), so that a
70B-class body fits one multi-GPU pod. Blocks are never split across devices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from splitfed.models.parts import SplitPart

Device = int | str


def body_device_map(part: SplitPart, max_memory: Mapping[Device, int | str]) -> dict[str, Device]:
    """Which device each of the part's modules goes to, filling devices in order up to
    ``max_memory`` (bytes or strings like ``"20GiB"``, keys are GPU indices or ``"cpu"``)."""
    from accelerate import infer_auto_device_map  # seconds to import: only when placing

    block = type(part.blocks[0]).__name__
    device_map = infer_auto_device_map(
        part.base, max_memory=dict(max_memory), no_split_module_classes=[block]
    )
    return {f"base.{name}" if name else "base": device for name, device in device_map.items()}


def place_part(part: SplitPart, device_map: Mapping[str, Device]) -> SplitPart:
    """Move the part's modules as ``device_map`` says; activations follow through hooks."""
    from accelerate import dispatch_model

    base_map = {}
    for name, device in device_map.items():
        if name != "base" and not name.startswith("base."):
            raise ValueError(f"device map entry {name!r} is not inside the part's base model")
        base_map[name.removeprefix("base").removeprefix(".")] = device
    dispatch_model(part.base, device_map=base_map)
    return part


# What `[backbone] device` may say (docs/backbone.md): one device ("cpu", "cuda",
# "cuda:1"), "auto" (the body's blocks over every visible GPU, by free memory; the CPU
# where there is none), or blocks per device, in order ("cuda:0=16,cuda:1=14").
AUTO = "auto"


def parse_device(spec: str) -> str | list[tuple[str, int]]:
    """One device, :data:`AUTO`, or the (device, blocks) pairs of a blocks-per-device
    spec; ``ValueError`` naming what is wrong."""
    spec = spec.strip()
    if not spec:
        raise ValueError("device is empty: give cpu, cuda, cuda:N, auto or cuda:0=16,cuda:1=14")
    if spec == AUTO:
        return AUTO
    if "=" not in spec and "," not in spec:
        try:
            torch.device(spec)
        except RuntimeError:
            raise ValueError(
                f"device {spec!r} is no torch device: give cpu, cuda, cuda:N, auto or "
                "blocks per device (cuda:0=16,cuda:1=14)"
            ) from None
        return spec
    pairs = []
    for item in spec.split(","):
        device, sep, count = item.strip().partition("=")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(
                f"device {spec!r}: each entry must be DEVICE=BLOCKS with BLOCKS >= 1 "
                f"(e.g. cuda:0=16,cuda:1=14), got {item.strip()!r}"
            )
        try:
            torch.device(device.strip())
        except RuntimeError:
            raise ValueError(f"device {spec!r}: {device.strip()!r} is no torch device") from None
        pairs.append((device.strip(), int(count)))
    return pairs


def blocks_per_device(pairs: list[tuple[str, int]], num_blocks: int) -> list[str]:
    """The device of each of ``num_blocks`` blocks, as the pairs of a blocks-per-device
    spec say (their counts must add up to the blocks)."""
    total = sum(count for _, count in pairs)
    if total != num_blocks:
        raise ValueError(
            f"the device map places {total} blocks but the body has {num_blocks}: make the "
            f"counts add up to {num_blocks}"
        )
    return [device for device, count in pairs for _ in range(count)]


def auto_blocks(part: SplitPart, reserve_bytes: int = 0) -> list[str]:
    """The device of each block of ``part`` over every visible GPU, filled in order up to
    its free memory less ``reserve_bytes`` (KV caches, activations); every block on the
    CPU where no GPU is visible. ``ValueError`` if the GPUs cannot hold the blocks."""
    if not torch.cuda.is_available():
        return ["cpu"] * len(part.blocks)
    max_memory: dict[Device, int] = {}
    for index in range(torch.cuda.device_count()):
        free, _ = torch.cuda.mem_get_info(index)
        max_memory[index] = max(0, free - reserve_bytes)
    device_map = body_device_map(part, {**max_memory, "cpu": 0})
    devices = []
    for index in range(len(part.blocks)):
        device = device_map.get(f"base.layers.{index}", device_map.get("base"))
        if device is None or device in ("cpu", "disk"):
            raise ValueError(
                f"the body's {len(part.blocks)} blocks do not fit the free memory of "
                f"{len(max_memory)} GPU(s) (reserving {reserve_bytes} bytes on each)"
            )
        devices.append(f"cuda:{device}" if isinstance(device, int) else str(device))
    return devices


# Where place_blocks records a block's device (an attribute, so that the deep copies of a
# block made for each session keep it, as they keep its hook).
_DEVICE = "splitfed_device"


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (tuples, lists, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _align(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block's forward pre-hook: its inputs (hidden states, mask, position
    embeddings) to the block's device."""
    device = block_device(block)
    assert device is not None  # the hook is registered with the device
    return _to(args, device), _to(kwargs, device)


def block_device(block: nn.Module) -> torch.device | None:
    """The device :func:`place_blocks` gave ``block`` (None: not placed block by block)."""
    device: torch.device | None = vars(block).get(_DEVICE)
    return device


def place_blocks(part: SplitPart, devices: list[str]) -> SplitPart:
    """Put block i of ``part`` on ``devices[i]`` and the rest of its base model on the
    first block's device; each block's inputs follow it (a forward pre-hook), so hidden
    states move from device to device as a pipeline's would, and KV caches stay by their
    block. Modules move one at a time: the part is never whole on one device. One
    device: a plain move. (Accelerate's dispatch does this for whole models; a part's
    blocks deep-copied per session keep the hook and the device with them.)"""
    if len(devices) != len(part.blocks):
        raise ValueError(f"{len(devices)} devices for {len(part.blocks)} blocks")
    if len(set(devices)) == 1:
        return part.to(devices[0])
    blocks = part.blocks
    for module in part.base.children():
        if module is not blocks:
            module.to(devices[0])
    if part.lm_head is not None:
        part.lm_head.to(devices[-1])
    if part.prefix is not None:
        part.prefix.to(devices[0])
    for block, device in zip(blocks, devices, strict=True):
        block.to(device)
        placed = _DEVICE in vars(block)
        vars(block)[_DEVICE] = torch.device(device)
        if not placed:
            block.register_forward_pre_hook(_align, with_kwargs=True)
    return part


def free_bytes(device: torch.device | str) -> int | None:
    """Memory ``device`` can still give: a GPU's free memory plus what torch's allocator
    holds unused; for the CPU, the kernel's MemAvailable. None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + held)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def utilisation(device: torch.device | str) -> float | None:
    """Percent of the last sample period a GPU was busy (NVML), None where unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no pynvml, or NVML refuses: not available here
        return None
