"""Quantized frozen weights: the linear layers of a part's blocks in 8-bit or 4-bit.

``none``  the checkpoint's weights as they are (in the part's dtype).
``int8``  int8 weights, one scale per output row (~1 byte per weight): on a CPU torchao's
          int8 weight-only tensor (``Int8WeightOnlyConfig``: the matmul dequantizes in
          its kernel, activations stay in the compute dtype); on CUDA bitsandbytes'
          ``Linear8bitLt`` (LLM.int8, outlier threshold 0: every weight int8).
``nf4``   4-bit NormalFloat through bitsandbytes (``Linear4bit``, blocks of 64 weights,
          double-quantized scales as in QLoRA; ~0.53 byte per weight), CPU and CUDA.

Only the linear projections inside the blocks are quantized (attention and MLP: what holds
~all of a block's weights); the input embeddings, the norms and the LM head stay in the
part's dtype, as bitsandbytes' transformers integration leaves them. Adapters train on
top (QLoRA): peft wraps a quantized projection like any other (its LoRA A and B stay in
floating point) and gradients flow through the frozen quantized weights to the inputs.

Quantization happens while a part loads (models/loading.py feeds ``quantized_linear`` one
projection at a time from the memory-mapped checkpoint), so a quantized part never exists
in full precision.

Which library, measured (bench/quantization_backends.py, docs/models.md "Backends"): for
int8 on a CPU, torchao's weight-only tensor was 1.4-6x faster than bitsandbytes' CPU int8
(forward and backward, Llama-2-7B's projections, float32 and bfloat16) at the same error;
bitsandbytes' eval-mode LLM.int8 doubles the error and bitsandbytes computes differently
in training and eval mode on a CPU, which a body shared by training and generating
sessions cannot have. NF4 is bitsandbytes' on both devices (QLoRA's format, with CPU and
CUDA kernels), and so is int8 on CUDA (LLM.int8 kernels).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
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
    try:
        with _quiet(*_NOISY_IMPORTS):
            yield
    finally:
        if saved is ...:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


# Loggers that warn while bitsandbytes and torchao import (either imports the other):
# bitsandbytes about the Hub kernel it is not given, torchao about CUDA extensions a CPU
# build cannot load, torch about enums torchao registers.
_NOISY_IMPORTS = ("bitsandbytes", "torchao", "torch.utils._pytree")


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def prepare_imports() -> None:
    """Import bitsandbytes and torchao (where installed) the quiet way, before peft or
    transformers do (:func:`prepare_bitsandbytes`, :func:`prepare_torchao`)."""
    prepare_bitsandbytes()
    prepare_torchao()


def prepare_bitsandbytes() -> None:
    """Import bitsandbytes (if installed) before peft does (peft imports it at import
    time whenever it is installed): its own import must not reach the network
    (models/peft_import.py runs this first)."""
    if "bitsandbytes" not in sys.modules:
        with suppress(ValueError):
            bitsandbytes()


def prepare_torchao() -> None:
    """Import torchao (if installed) before transformers' model code does (it imports it
    whenever it is installed): its import warns about CUDA extensions a CPU build cannot
    load, and torch about enums torchao registers; not a user's concern
    (models/__init__.py runs this first)."""
    if "torchao" not in sys.modules:
        with suppress(ValueError):
            torchao_quantization()
        # transformers' torchao integration imports more of torchao, which warns too.
        with _quiet(*_NOISY_IMPORTS), suppress(ImportError):
            import transformers.quantizers  # noqa: F401


def torchao_quantization() -> ModuleType:
    """``torchao.quantization``; ``ValueError`` saying how to get it if it is missing."""
    try:
        with _quiet(*_NOISY_IMPORTS):
            import torchao.quantization
    except ImportError as exc:
        raise ValueError(
            f"int8 on a CPU needs torchao (pip install 'torchao>=0.14'): {exc}"
        ) from None
    module: ModuleType = torchao.quantization
    return module


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
    """A frozen quantized projection on ``device`` computing ``x @ weight.T + bias``
    (``weight``: ``[out, in]``, any floating dtype) in ``compute_dtype``; its output has
    the input's dtype."""
    check_quantization(mode)
    if mode == NONE:
        raise ValueError("quantized_linear needs a quantization other than none")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"a projection's weight must be a 2-D float tensor, got {weight.shape}")
    in_features = int(weight.shape[1])
    if mode == "nf4" and in_features % NF4_BLOCK:
        raise ValueError(
            f"nf4 needs projections whose input size is a multiple of {NF4_BLOCK}; this one "
            f"has {in_features}"
        )
    device = torch.device(device)
    module: nn.Module
    if mode == "int8" and device.type == "cpu":
        module = _torchao_int8(weight, bias, compute_dtype)
    else:
        module = _bitsandbytes(weight, bias, mode, compute_dtype, device)
    module.requires_grad_(False)
    return module


def _set_bias(module: nn.Module, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    if bias is not None:
        # A copy: never a view of the checkpoint's memory map (models/loading.py).
        copied = bias.detach().to(dtype, copy=True).contiguous()
        module.bias = nn.Parameter(copied, requires_grad=False)


def _torchao_int8(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> nn.Module:
    ao = torchao_quantization()
    out_features, in_features = (int(n) for n in weight.shape)
    module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(
        weight.detach().to("cpu", compute_dtype).contiguous(), requires_grad=False
    )
    _set_bias(module, bias, compute_dtype)
    ao.quantize_(module, ao.Int8WeightOnlyConfig())
    return module


def _bitsandbytes(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    bnb = bitsandbytes()
    out_features, in_features = (int(n) for n in weight.shape)
    module: nn.Module
    if mode == "int8":
        module = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
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
            bias=bias is not None,
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
    _set_bias(module, bias, compute_dtype)
    # Moving the parameters to a real device is what quantizes them (bitsandbytes).
    quantized: nn.Module = module.to(device)
    return quantized


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
    bnb = sys.modules.get("bitsandbytes")
    for sub in module.modules():
        if bnb is not None and isinstance(sub, bnb.nn.Linear8bitLt):
            return "int8"
        if bnb is not None and isinstance(sub, bnb.nn.Linear4bit):
            return "nf4"
        weight = getattr(sub, "weight", None)
        if type(weight).__module__.startswith("torchao"):
            return "int8"
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


def tensor_storages(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(data pointer, bytes) of each storage behind ``tensor``: its own, or for a wrapper
    subclass (torchao's quantized tensors, which have none) those of its inner tensors."""
    wrapper: Any = tensor
    if is_traceable_wrapper_subclass(wrapper):
        inner = wrapper.__tensor_flatten__()[0]
        return [found for name in inner for found in tensor_storages(getattr(wrapper, name))]
    storage = tensor.untyped_storage()
    return [(storage.data_ptr(), storage.nbytes())]


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
            for pointer, size in tensor_storages(value):
                if (str(value.device), pointer) not in seen:
                    seen.add((str(value.device), pointer))
                    total += size
        elif hasattr(value, "absmax") or hasattr(value, "SCB"):  # quantization state
            for inner in vars(value).values():
                count(inner)

    for item in _frozen_objects(module):
        count(item)
        count(getattr(item, "quant_state", None))
        count(getattr(item, "SCB", None))
    return total
