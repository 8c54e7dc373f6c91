"""The LM head in `sanitize`: drop a stored head only where transformers would not use it.

transformers 5 ties the head to the embedding when the config says so, but only if a
stored `lm_head.weight` equals the embedding: a different stored head is kept and used
(with a warning). A model built tied has no head of its own, so such a checkpoint is
refused here rather than silently computing other logits. An untied config with no
stored head is refused too: transformers would initialise that head at random.
"""

from __future__ import annotations

import mlx.core as mx

HEAD_KEY = "lm_head.weight"
_HEAD_PARTS = ("weight", "scales", "biases")


def _said(model_type: str, tied: bool, given: bool) -> str:
    value = "true" if tied else "false"
    if given:
        return f"sets tie_word_embeddings to {value}"
    return f"omits tie_word_embeddings, and transformers' default for {model_type} is {value}"


def sanitize_lm_head(
    weights: dict[str, mx.array], embed_prefix: str, tied: bool, model_type: str, given: bool = True
) -> dict[str, mx.array]:
    """`weights` without a tied head's copy; ValueError (naming the tensor and the key) where the head is used.

    `embed_prefix` is the embedding's module path in `weights` ("model.embed_tokens"); `given`
    says whether config.json set `tie_word_embeddings` (False: the per-model default applied).
    """
    if not tied:
        if HEAD_KEY not in weights:
            raise ValueError(
                f"The checkpoint has no {HEAD_KEY}, but its config.json {_said(model_type, tied, given)}, so the "
                "LM head is its own tensor (transformers would initialise it at random). Add lm_head.weight to "
                'the checkpoint, or set "tie_word_embeddings": true in config.json if the head is the embedding.'
            )
        return weights
    if HEAD_KEY in weights:
        for part in _HEAD_PARTS:
            head, embed = weights.get(f"lm_head.{part}"), weights.get(f"{embed_prefix}.{part}")
            if head is None and embed is None:
                continue
            if head is None or embed is None or head.shape != embed.shape or not mx.array_equal(head, embed).item():
                raise ValueError(
                    f"The checkpoint's {HEAD_KEY} differs from {embed_prefix}.weight, but its config.json "
                    f"{_said(model_type, tied, given)}. transformers then keeps the stored head and uses it; set "
                    '"tie_word_embeddings": false in config.json to load that head.'
                )
    return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
