"""peft, imported one way: after bitsandbytes' guarded import.

peft imports bitsandbytes at import time whenever it is installed (``peft.helpers``), and
bitsandbytes' own import would ask the Hugging Face Hub for a CPU kernel
(models/quantization.py). splitfed imports peft's names from here, and only where LoRA is
used (the backbone, a training client, exports): a process that only reads adapter files
or averages them (the aggregator) loads neither peft nor bitsandbytes.
"""

from splitfed.models.quantization import prepare_bitsandbytes

prepare_bitsandbytes()

# ruff: noqa: E402
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.torchao import TorchaoLoraLinear

__all__ = [
    "LoraConfig",
    "LoraLayer",
    "LoraLinear",
    "PeftModel",
    "TorchaoLoraLinear",
    "inject_adapter_in_model",
]
