"""Families whose vision tower maps each row of `pixel_values` (an image, or a tile of one) to a fixed
number of soft tokens, and whose language model uses plain 1-D positions: Gemma 3 and InternVL.

Cached features are kept per prompt as one [image tokens, D] tensor (the prompt's rows' tokens in
order; D the language model's hidden size) and handed back as the `mm_encoder_outputs` the forward
accepts.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import Family, inner_model


class PooledFeaturesFamily(Family):
    fast_path = True
    lacks = None

    def _vision_output(self, model, pixel_values):
        return inner_model(model).get_image_features(pixel_values, return_dict=True)

    def image_features(self, model, image_inputs, prompts):
        pooled = self._vision_output(model, image_inputs["pixel_values"]).pooler_output  # [rows, tokens, D]
        rows = [inputs["pixel_values"].shape[0] for inputs in prompts.image_inputs if inputs]
        return [(part.flatten(0, 1),) for part in torch.split(pooled, rows)]

    def features_kwargs(self, features):
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=torch.cat([f[0] for f in features]))}}

    def vision_modules(self, model):
        inner = inner_model(model)
        return [inner.vision_tower, inner.multi_modal_projector]
