"""Model families: one module each, behind the one interface of `base.Family`.

`family_for(model, processor)` picks the module for the model's `model_type`; a model of no known
family gets `Family` itself, the plain path, and a one-line notice saying what it lacks.

Adding a family is one new module here, listed in `FAMILY_MODULES`. It holds the family's `Family`
subclass (`FAMILY`) and its tiny random-weight models (`TINY_MODELS`: transformers `model_type` ->
`tiny_parts.TinyModel`), which grpo/tiny.py builds for the tests and the CPU demo; the tests run
every family of `TINY_MODELS`.
"""

from __future__ import annotations

import sys

from . import gemma3, internvl, qwen2_vl, qwen3_5, qwen3_vl
from .base import Family, inner_model, text_config, unwrap
from .tiny_parts import TinyModel

FAMILY_MODULES = (qwen2_vl, qwen3_vl, qwen3_5, gemma3, internvl)
FAMILY_CLASSES = tuple(module.FAMILY for module in FAMILY_MODULES)
TINY_MODELS: dict[str, TinyModel] = {name: tiny for module in FAMILY_MODULES for name, tiny in module.TINY_MODELS.items()}
_BY_MODEL_TYPE = {model_type: cls for cls in FAMILY_CLASSES for model_type in cls.model_types}


def family_class(config) -> type[Family]:
    """The family class serving a model config's `model_type`; `Family` (the plain path) for any other.
    Its static facts (`Family.image_token_pixels`) need no loaded model."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None), Family)


def family_for(model, processor, *, quiet: bool = False, chat_template_kwargs: dict | None = None) -> Family:
    """The family object for `model` (a DeepSpeed engine is looked through) and its processor;
    `chat_template_kwargs` go to every rendering of its chat template (`enable_thinking`, ...).

    A model of no known family runs the plain path, said once on stderr unless `quiet`.
    A model the plain path cannot run either (no causal-LM head) is refused.
    """
    module = unwrap(model)
    model_type = getattr(module.config, "model_type", None)
    cls = family_class(module.config)
    if cls is Family:
        if not hasattr(module, "get_output_embeddings") or module.get_output_embeddings() is None:
            raise ValueError(f"{type(module).__name__} (model_type {model_type!r}) has no language-model head: "
                             f"GRPO needs a model that predicts the next token (AutoModelForImageTextToText or "
                             f"AutoModelForCausalLM)")
    family = cls(module, processor, chat_template_kwargs)
    if family.lacks and not quiet:
        print(f"[grpo] {type(module).__name__} (model_type {model_type!r}): {family.lacks}; training on the plain path",
              file=sys.stderr)
    return family


__all__ = ["FAMILY_CLASSES", "FAMILY_MODULES", "TINY_MODELS", "Family", "family_class", "family_for", "inner_model", "text_config", "unwrap"]
