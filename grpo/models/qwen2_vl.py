"""Qwen2-VL and Qwen2.5-VL (also Lingshu, HuatuoGPT-Vision, MedVLThinker, which are these).

Positions are 3-D mRoPE from the model's own `get_rope_index`, which needs the processor's
`mm_token_type_ids` (without it the model silently falls back to 1-D positions for image tokens).
A continuation's tokens take the prompt's largest position + 1 onwards on all three rows, as the
model's generation does. The vision tower (`visual`, its patch merger included) returns one
feature tensor per image, [merged tokens, hidden]; cached, they are handed back as the
`mm_encoder_outputs` the forward accepts.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import Family, inner_model


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    fast_path = True
    packs_groups = True
    lacks = None
    token_type_key = "mm_token_type_ids"
    position_rows = 3
    extra_vision_tokens = ("<|vision_pad|>",)

    def positions(self, model, input_ids, token_types, image_inputs, attention_mask):
        positions, _ = inner_model(model).get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=image_inputs.get("image_grid_thw"),
            attention_mask=attention_mask)
        return positions  # [3, B, L]

    def vision_modules(self, model):
        return [inner_model(model).visual]

    @staticmethod
    def image_token_pixels(processor):
        images = processor.image_processor
        return images.patch_size * images.merge_size  # 14 * 2 (Qwen2/2.5-VL), 16 * 2 (Qwen3-VL, Qwen3.5)

    def _vision_output(self, model, image_inputs):
        return inner_model(model).get_image_features(
            image_inputs["pixel_values"], image_inputs["image_grid_thw"], return_dict=True)

    def image_features(self, model, image_inputs, prompts):
        per_image = self._vision_output(model, image_inputs).pooler_output  # one [tokens, hidden] per image
        return [(torch.cat(group),) for group in _per_prompt(per_image, prompts)]

    def features_kwargs(self, features):
        # A fresh dict per call: the model fills in missing modalities of the one it is given.
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(f[0] for f in features))}}


def _per_prompt(per_image, prompts) -> list[list]:
    """Per-image items grouped by prompt (prompts with images only, in order)."""
    groups, start = [], 0
    for count in prompts.images_per_prompt:
        if count:
            groups.append(list(per_image[start : start + count]))
            start += count
    return groups
