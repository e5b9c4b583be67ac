"""Qwen3-VL (and Qwen3-VL-MoE): Qwen2.5-VL's positions and prompt format, plus DeepStack.

DeepStack: the vision tower also returns features from some of its layers, added to the hidden
states of the image tokens in the first language-model layers. Cached image features must carry
them (handing back only the final features raises in the model), so each prompt's cache entry is
(final features, DeepStack layer 1, layer 2, ...), all [image tokens, hidden].
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .qwen2_vl import Qwen2VLFamily, _per_prompt


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def image_features(self, model, image_inputs, prompts):
        out = self._vision_output(model, image_inputs)
        final = _per_prompt(out.pooler_output, prompts)
        layers = [_per_prompt(layer, prompts) for layer in out.deepstack_features]  # [layer][prompt][image]
        return [(torch.cat(final[p]), *(torch.cat(layer[p]) for layer in layers)) for p in range(len(final))]

    def features_kwargs(self, features):
        layers = len(features[0]) - 1
        output = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(f[0] for f in features),
            deepstack_features=[tuple(f[1 + k] for f in features) for k in range(layers)],
        )
        return {"mm_encoder_outputs": {"image": output}}
