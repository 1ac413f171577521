"""Quantized frozen weights: the linear layers of a part's blocks in 8-bit or 4-bit.

``none``  the checkpoint's weights as they are (in the part's dtype).
``int8``  LLM.int8 weights through bitsandbytes (``Linear8bitLt``, one scale per output
          row, outlier threshold 0: every weight is int8; ~1 byte per weight).
``nf4``   4-bit NormalFloat through bitsandbytes (``Linear4bit``, blocks of 64 weights,
          double-quantized scales as in QLoRA; ~0.53 byte per weight).

Only the linear projections inside the blocks are quantized (attention and MLP: what holds
~all of a block's weights); the input embeddings, the norms and the LM head stay in the
part's dtype, as bitsandbytes' transformers integration leaves them. Adapters train on
top (QLoRA): peft wraps a quantized projection like any other (its LoRA A and B stay in
floating point) and gradients flow through the frozen quantized weights to the inputs.

Quantization happens while a part loads (``quantize_tensors`` is fed one projection at a
time from the memory-mapped checkpoint), so a quantized part never exists in full
precision: peak memory is the quantized part plus one projection.

Why bitsandbytes for both modes (measured, docs/models.md "Quantized bodies"): it is the
one library that does int8 and NF4 on CPU and CUDA with the same weight format, peft's
QLoRA path is built on it, and backward to the inputs works for both. torchao's int8
weight-only matmul was as fast at float32 compute and 2-3x faster at bfloat16 on CPU, but
it would be a second library for one mode, and once installed it is imported (by peft) in
every process, at a second's cost and with log noise. On a CPU a quantized body saves
memory, not time: its matmuls dequantize first and are slower than bfloat16 ones.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

NONE = "none"
QUANTIZATIONS = (NONE, "int8", "nf4")
# Weights per block of NF4 scales (bitsandbytes' default and QLoRA's).
NF4_BLOCK = 64


def check_quantization(mode: str) -> str:
    """``mode`` if it names a quantization; ``ValueError`` naming the choices otherwise."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {mode!r}")
    return mode


@contextmanager
def _without_hub_kernels() -> Iterator[None]:
    """bitsandbytes' CPU backend tries, at import, to fetch a kernel from the Hugging
    Face Hub through the ``kernels`` package. splitfed never downloads at run time: the
    import sees no ``kernels`` (bitsandbytes falls back to its own kernels) and its
    warning about that is not shown."""
    saved = sys.modules.get("kernels", ...)
    sys.modules["kernels"] = None  # type: ignore[assignment]
    quiet = [logging.getLogger(name) for name in ("bitsandbytes", "bitsandbytes.backends")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        if saved is ...:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


def prepare_imports() -> None:
    """Import bitsandbytes (if installed) before anything else does: peft imports it as
    soon as it is installed, and its import must not reach the network."""
    if "bitsandbytes" in sys.modules:
        return
    with suppress(ValueError):
        bitsandbytes()


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module; ``ValueError`` saying how to get it if it is missing."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None:
        return sys.modules["bitsandbytes"]
    try:
        with _without_hub_kernels():
            import bitsandbytes
    except ImportError as exc:
        raise ValueError(
            f"quantization needs bitsandbytes (pip install 'bitsandbytes>=0.49'): {exc}"
        ) from None
    return bitsandbytes


def release_freed_memory() -> None:
    """Hand memory freed by quantizing back to the system (glibc keeps the temporaries
    of quantization, several times the quantized weights, in its heap otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    with suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a projection this module quantizes (``nn.Linear``, or
    GPT-2's ``Conv1D``, whose weight is stored transposed)."""
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def quantized_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    *,
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A frozen quantized projection computing ``x @ weight.T + bias`` (``weight``:
    ``[out, in]``, any floating dtype). Its output has the input's dtype."""
    check_quantization(mode)
    if mode == NONE:
        raise ValueError("quantized_linear needs a quantization other than none")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"a projection's weight must be a 2-D float tensor, got {weight.shape}")
    bnb = bitsandbytes()
    out_features, in_features = (int(n) for n in weight.shape)
    if mode == "nf4" and in_features % NF4_BLOCK:
        raise ValueError(
            f"nf4 needs projections whose input size is a multiple of {NF4_BLOCK}; this one "
            f"has {in_features}"
        )
    has_bias = bias is not None
    module: nn.Module
    if mode == "int8":
        module = _int8_linear_class()(
            in_features,
            out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        module.weight = bnb.nn.Int8Params(
            weight.detach().contiguous(), requires_grad=False, has_fp16_weights=False
        )
    else:
        module = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        module.weight = bnb.nn.Params4bit(
            weight.detach().contiguous(),
            requires_grad=False,
            blocksize=NF4_BLOCK,
            compress_statistics=True,
            quant_type="nf4",
        )
        # Off: bitsandbytes' AVX512-BF16 layout rewrites the weight in place on the first
        # inference pass without autograd, and has no backward; a body shared by training
        # and generating sessions must keep one layout.
        setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010
    if bias is not None:
        module.bias = nn.Parameter(
            bias.detach().to(compute_dtype, copy=True).contiguous(), requires_grad=False
        )
    # Moving the parameters to a real device is what quantizes them (bitsandbytes).
    quantized: nn.Module = module.to(device)
    quantized.requires_grad_(False)
    return quantized


@functools.cache
def _int8_linear_class() -> type[nn.Module]:
    bnb = bitsandbytes()

    class Int8Linear(bnb.nn.Linear8bitLt):  # type: ignore[misc, name-defined]
        """bitsandbytes' int8 projection computing the same way in training and in eval
        mode. On a CPU bitsandbytes dequantizes the weight in training mode (weight-only
        int8) but quantizes the inputs too in eval mode (LLM.int8: float16 then int8 per
        row, slower on a CPU and further from the full-precision output); a body serving
        training and generation at once must give one answer, so CPU projections always
        take the weight-only path. CUDA keeps bitsandbytes' own choice (LLM.int8 in both
        modes). The bias is cast per call, never rewritten in place (it is shared)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = self.state
            state.is_training = self.training or x.device.type in ("cpu", "xpu")
            if self.weight.CB is not None:
                self.init_8bit_state()
            bias = self.bias
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            out: torch.Tensor = bnb.matmul(x, self.weight, bias=bias, state=state)
            if not state.has_fp16_weights and state.CB is not None:
                self.weight.data = state.CB
            return out

    return Int8Linear


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A dense projection's weight as ``[out, in]`` (GPT-2's ``Conv1D`` is transposed)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.t() if isinstance(module, Conv1D) else weight


def quantize_modules(
    root: nn.Module, prefix: str, mode: str, *, compute_dtype: torch.dtype | None = None
) -> list[str]:
    """Replace every dense projection of ``root`` under ``prefix`` (a dotted path; "" for
    all) by its quantized form, in place, one at a time. Returns the replaced names."""
    check_quantization(mode)
    if mode == NONE:
        return []
    names = [
        name
        for name, module in root.named_modules()
        if quantizable(module) and (not prefix or name.startswith(prefix))
    ]
    for name in names:
        module = root.get_submodule(name)
        weight = linear_weight(module)
        bias = module.bias if isinstance(module.bias, torch.Tensor) else None
        dtype = compute_dtype or weight.dtype
        root.set_submodule(
            name,
            quantized_linear(weight, bias, mode, compute_dtype=dtype, device=weight.device),
        )
    return names


def quantization_of(module: nn.Module) -> str:
    """The quantization of ``module``'s projections: ``int8``, ``nf4`` or ``none``."""
    if "bitsandbytes" not in sys.modules:
        return NONE
    bnb = sys.modules["bitsandbytes"]
    for sub in module.modules():
        if isinstance(sub, bnb.nn.Linear8bitLt | _int8_linear_class()):
            return "int8"
        if isinstance(sub, bnb.nn.Linear4bit):
            return "nf4"
    return NONE


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype ``module`` computes in (its quantized weights are integers)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _frozen_objects(module: nn.Module) -> Iterator[Any]:
    """Every object holding ``module``'s frozen weights: parameters, buffers, and the
    quantization state bitsandbytes keeps beside them (NF4 scales on the weight, the
    int8 matmul state on the module)."""
    yield from module.parameters()
    yield from module.buffers()
    for sub in module.modules():
        state = getattr(sub, "state", None)
        if state is not None and hasattr(state, "SCB"):
            yield state  # an int8 projection's matmul state: its CB is the weight


def frozen_memo(module: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that makes copies of ``module`` share its frozen weights
    and their quantization state instead of copying them."""
    return {id(item): item for item in _frozen_objects(module)}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s weights as they sit in memory, quantized weights and their
    scales included (each storage counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def count(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                return
            storage = value.untyped_storage()
            key = (str(value.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif hasattr(value, "absmax") or hasattr(value, "SCB"):  # quantization state
            for inner in vars(value).values():
                count(inner)

    for item in _frozen_objects(module):
        count(item)
        count(getattr(item, "quant_state", None))
        count(getattr(item, "SCB", None))
    return total
