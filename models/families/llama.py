"""Llama (Llama-2, Llama-3) and the architectures that share its layout: Mistral, Qwen2,
Qwen3. Their base models keep ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``."""

from splitfed.models.families.base import Family, register_family

LLAMA = register_family(
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        base_attr="model",
        layers_attr="layers",
        norm_attr="norm",
        embed_attrs=("embed_tokens",),
    )
)
