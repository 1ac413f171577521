"""GPU check of splitfed.models: split == unsplit on CUDA, and loading straight to the GPU.

Not collected by pytest (CI has no GPU). Run on a machine with CUDA from the repository
root, with the package importable (an install, or the link tree of `make typecheck` on
PYTHONPATH), and a JSON path to write the figures to:

    python tests/gpu/check_models.py /tmp/gpu.json

Checks, per family (llama, qwen2, glm4, gpt2, mistral, glm): fp32 logits of the split
against the unsplit model (TF32 off), 32 greedy tokens against ``generate``, bf16 logits;
LoRA gradients split vs unsplit; ``load_part(device="cuda", dtype=bfloat16)``.
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "tests")
import transformers
from modelkit import assert_adapter_grads_equal, padded_batch, tiny_model
from peft import inject_adapter_in_model

from splitfed.models import positions_from_mask, split_model
from splitfed.models.adapters import LoraSettings
from splitfed.models.generation import LocalStage, SamplingOptions, SplitGenerator
from splitfed.models.loading import load_part

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
print(
    "torch",
    torch.__version__,
    "transformers",
    transformers.__version__,
    torch.cuda.get_device_name(0),
    flush=True,
)
results = {}


def run(parts, ids, mask):
    h, b, t = parts
    return t(b(h(ids, mask), mask), mask)


for family in ["llama", "qwen2", "glm4", "gpt2", "mistral", "glm"]:
    model = tiny_model(family).to(dev)
    ids, mask = (x.to(dev) for x in padded_batch())
    ref = model(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, ids.shape[1])
    ).logits
    got = run(split_model(copy.deepcopy(model), 2, 1), ids, mask)
    fp32 = (got - ref).abs().max().item()
    gen_ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, ids.shape[1] :]
    h, b, t = split_model(copy.deepcopy(model), 2, 1)
    gen = SplitGenerator(h, LocalStage(b), t).generate(
        ids, mask, SamplingOptions(max_new_tokens=32)
    )
    mb = model.to(torch.bfloat16)
    refb = mb(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, ids.shape[1])
    ).logits
    gotb = run(split_model(copy.deepcopy(mb), 2, 1), ids, mask)
    results[family] = {
        "fp32_max_diff": fp32,
        "greedy_equal": bool(torch.equal(gen, gen_ref)),
        "bf16_max_diff": (gotb.float() - refb.float()).abs().max().item(),
    }
    print(family, results[family], flush=True)
# LoRA grads on GPU
model = tiny_model("llama").to(dev)
inject_adapter_in_model(
    LoraSettings(r=4, alpha=8, init=False).peft_config(["q_proj", "k_proj", "v_proj", "o_proj"]),
    model,
)
for n, p in model.named_parameters():
    p.requires_grad_(".lora_" in n)
ids, mask = (x.to(dev) for x in padded_batch(side="right"))
labels = ids.masked_fill(mask == 0, -100)
parts = split_model(copy.deepcopy(model), 2, 2)
model(
    input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask, 9), labels=labels
).loss.backward()
model.loss_function(run(parts, ids, mask), labels, vocab_size=128).backward()
results["lora_grads_compared"] = assert_adapter_grads_equal(model, parts, 1e-5)
print("lora grads ok", results["lora_grads_compared"], flush=True)
# load_part straight to the GPU in bf16
tmp = Path("/tmp/ckpt")
tiny_model("llama").save_pretrained(tmp, max_shard_size="20KB")
parts = [
    load_part(tmp, p, 2, 1, dtype=torch.bfloat16, device="cuda") for p in ("head", "body", "tail")
]
ids, mask = (x.to(dev) for x in padded_batch())
out = run(parts, ids, mask)
results["load_part_cuda_bf16"] = {
    "device": str(out.device),
    "dtype": str(out.dtype),
    "param_devices": sorted({str(p.device) for part in parts for p in part.parameters()}),
}
print(results["load_part_cuda_bf16"], flush=True)
Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
print("done", flush=True)
