"""Qwen3-VL (and Qwen3-VL-MoE): Qwen2.5-VL's positions and prompt format, plus DeepStack.

DeepStack: the vision tower also returns features from some of its layers, added to the hidden
states of the image tokens in the first language-model layers. Cached image features must carry
them (handing back only the final features raises in the model), so each prompt's cache entry is
(final features, DeepStack layer 1, layer 2, ...), all [image tokens, D] (D: the language model's
hidden size).
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .qwen2_vl import QWEN_FORMAT, Qwen2VLFamily, _per_prompt, mrope_section, qwen_processor, qwen_token_ids
from .tiny_parts import TinyModel, special_ids


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


FAMILY = Qwen3VLFamily

# ---------------------------------------------------------------- tiny model (grpo/tiny.py)


def qwen3_vision(hidden_size: int, **extra) -> dict:
    """The Qwen3-VL / Qwen3.5 vision tower: 16-px patches merged 2x2, learned position embeddings on a
    square grid (interpolated to the image's), 2 blocks."""
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, **extra)


def _tiny_qwen3_vl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # DeepStack: the vision block listed in deepstack_visual_indexes also feeds its (merged) features
    # into the first language layers (get_image_features returns them as deepstack_features), so cached
    # image features must carry those too. mRoPE is interleaved (mrope_interleaved); the text config has
    # no layer_types. Qwen3VLProcessor returns the same keys as Qwen2.5-VL's (mm_token_type_ids,
    # image_grid_thw) and needs a Qwen3VLVideoProcessor. 16-px patches: a 56x56 image becomes 64x64, 4 tokens.
    from transformers import Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    heads = 4
    head_dim = hidden_size // heads
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": mrope_section(head_dim, 5 / 16), "mrope_interleaved": True},
            **special_ids(tokenizer, QWEN_FORMAT),
        ),
        vision_config=qwen3_vision(hidden_size, deepstack_visual_indexes=[0]),
        **qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return config, qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, min_pixels, max_pixels)


TINY_MODELS = {"qwen3_vl": TinyModel(QWEN_FORMAT, _tiny_qwen3_vl)}
