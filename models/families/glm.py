"""GLM-4 as transformers implements it natively (``Glm`` and ``Glm4`` classes): the same
outer layout as Llama (``embed_tokens``, ``layers``, ``norm``), with partial rotary
embeddings and, for GLM-4-0414, extra post-attention norms inside each block."""

from splitfed.models.families.base import Family, register_family

GLM = register_family(
    Family(
        name="glm",
        model_types=("glm", "glm4"),
        base_attr="model",
        layers_attr="layers",
        norm_attr="norm",
        embed_attrs=("embed_tokens",),
    )
)
