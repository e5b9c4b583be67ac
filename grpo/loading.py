"""Loading what a run trains: the model, its processor, the frozen reference policy, and LoRA merges.

A model is given loaded or as a hub name / local directory; an adapter directory (a LoRA checkpoint)
loads as its base model with the adapter on it (grpo/lora.py).
"""

from __future__ import annotations

import copy
import os

import torch

from . import lora
from .distributed import read_deepspeed_spec, reference_deepspeed_config, zero_stage
from .models import family_for


def load_model(model, dtype: str = "auto"):
    """A loaded model is returned as is; a name or a local directory goes through `from_pretrained`.
    A LoRA checkpoint (an adapter directory) loads as its base model with the adapter on it."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    if lora.is_adapter_checkpoint(model):
        return lora.with_adapter(load_model(lora.base_model_of(model), dtype), model)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    config = AutoConfig.from_pretrained(model)
    # Vision-language models first; a text-only model (text-only rows) loads as a causal LM.
    auto = AutoModelForImageTextToText if type(config) in AutoModelForImageTextToText._model_mapping else AutoModelForCausalLM
    return auto.from_pretrained(model, dtype=torch_dtype)


def load_processor(processor, model_name):
    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        return processor
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor or model_name)


def freeze_vision_tower(model, family) -> None:
    """Freeze the modules that make image features (the paper trains the language model only).
    A text-only model has none: nothing to freeze."""
    for module in family.vision_modules(model):
        module.requires_grad_(False)


def vision_modules_equal(ours: list, theirs: list) -> bool:
    """Whether two models' vision modules hold the same weights (then they may share image features)."""
    if not ours or len(ours) != len(theirs):
        return False
    for a, b in zip(ours, theirs):
        if a is b:
            continue
        if any(hasattr(p, "ds_id") for p in a.parameters()):
            return False  # ZeRO-3 partitions: the local tensors are placeholders, not the weights
        other = dict(b.named_parameters())
        if not all(name in other and torch.equal(p, other[name]) for name, p in a.named_parameters()):
            return False
    return True


def vision_trains(family, model) -> bool:
    """Whether any weight that makes image features trains (then cached features, which carry no
    gradient, cannot stand in for the pixels in a training forward)."""
    return any(p.requires_grad for module in family.vision_modules(model) for p in module.parameters())


def prepare_model(model, processor, cfg, device):
    """Load (if given a name or path), move to `device` unless DeepSpeed places it, freeze the vision
    tower if asked, enable gradient checkpointing if asked, and with `cfg.lora` wrap it in a PEFT
    model whose adapter is what trains (a model that already carries an adapter continues it:
    grpo/lora.py). Returns (model, processor, family)."""
    name = model if isinstance(model, (str, os.PathLike)) else None
    model = load_model(model, cfg.dtype)
    processor = load_processor(processor, name)
    family = family_for(model, processor, chat_template_kwargs=cfg.chat_template_kwargs)
    if not cfg.deepspeed:
        model.to(device)
    if cfg.freeze_vision_tower:
        freeze_vision_tower(model, family)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the rollout passes use_cache=True explicitly
    model = lora.prepare(model, family, cfg.lora)
    return model, processor, family


def prepare_reference_model(ref_model, policy, family, cfg, device):
    """The frozen reference policy for the KL term: `ref_model` (name, path or model) or a copy of
    the policy. Under ZeRO-3 it is sharded like the policy (an inference-only engine); otherwise
    every process holds a full copy, less the policy's frozen vision modules: they stay as they
    are for the whole run, so the copy shares them instead of copying them (Qwen2.5-VL-7B's tower
    is 0.67 B parameters).

    Under LoRA without a `ref_model` there is no second model: None is returned and the reference is
    the policy itself in `lora.reference_mode` (adapters off; a continued adapter keeps a frozen copy
    of itself as it started, added here).
    """
    if ref_model is None and lora.is_peft_model(policy):
        if cfg.lora is None:  # continuing an adapter: the reference is that adapter as it starts
            lora.add_reference_adapter(policy)
        return None
    zero3 = bool(cfg.deepspeed) and zero_stage(read_deepspeed_spec(cfg.deepspeed)) == 3
    if ref_model is not None:
        ref = load_model(ref_model, cfg.dtype)
    else:
        # Not under ZeRO-3: each engine partitions the parameters of its own modules.
        frozen = [] if zero3 or vision_trains(family, policy) else family.vision_modules(policy)
        ref = copy.deepcopy(policy, memo={id(module): module for module in frozen})
    ref.eval().requires_grad_(False)
    if zero3:
        import deepspeed

        # Inference only: the policy's batch sizes, accumulation and clipping are not checked here.
        ds = reference_deepspeed_config(cfg.deepspeed, bf16=next(ref.parameters()).dtype == torch.bfloat16)
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()
        return engine
    return ref.to(device)


def merge_lora(checkpoint_dir: str, output_dir: str, base_model=None, dtype: str = "auto") -> str:
    """Write base + the adapter of `checkpoint_dir`, merged, as a plain `save_pretrained` model (and
    the checkpoint's processor) into `output_dir`, for serving or evaluation without peft.

    `base_model`: a loaded model, a hub name or a directory; by default the one the adapter's
    `adapter_config.json` names.
    """
    base = load_model(base_model if base_model is not None else lora.base_model_of(checkpoint_dir), dtype)
    merged = lora.with_adapter(base, checkpoint_dir, trainable=False).merge_and_unload()
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    try:
        processor = load_processor(None, checkpoint_dir)
    except (OSError, ValueError):  # a bare adapter directory: the base model's processor
        processor = load_processor(base_model if isinstance(base_model, (str, os.PathLike)) else None,
                                   lora.base_model_of(checkpoint_dir))
    processor.save_pretrained(output_dir)
    return output_dir
