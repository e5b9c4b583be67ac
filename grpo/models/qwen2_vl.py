"""Qwen2-VL and Qwen2.5-VL (also Lingshu, HuatuoGPT-Vision, MedVLThinker, which are these).

Positions are 3-D mRoPE from the model's own `get_rope_index`, which needs the processor's
`mm_token_type_ids` (without it the model silently falls back to 1-D positions for image tokens).
A continuation's tokens take the prompt's largest position + 1 onwards on all three rows, as the
model's generation does. The vision tower (`visual`, its patch merger included) returns one
feature tensor per image, [merged tokens, D] (D: the language model's hidden size); cached, they
are handed back as the `mm_encoder_outputs` the forward accepts.

Tiny models (grpo/tiny.py builds them for tests and the CPU demo): Qwen2-VL and Qwen2.5-VL, with the
Qwen chat format and the mRoPE / processor pieces the other Qwen families reuse.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import Family, inner_model
from .tiny_parts import ChatFormat, TinyModel, chatml_template, special_ids


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
        per_image = self._vision_output(model, image_inputs).pooler_output  # one [tokens, D] per image
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


FAMILY = Qwen2VLFamily

# ---------------------------------------------------------------- tiny models (grpo/tiny.py)

# Special tokens of the Qwen-VL chat format (the pad token first).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (also Qwen2.5-VL's, Qwen3-VL's and, without its thinking switch, Qwen3.5's).
CHAT_TEMPLATE = chatml_template("<|vision_start|><|image_pad|><|vision_end|>")

QWEN_FORMAT = ChatFormat(
    special_tokens=SPECIAL_TOKENS,
    pad_token="<|endoftext|>",
    eos_token="<|im_end|>",
    end_of_turn=("<|im_end|>",),
    chat_template=CHAT_TEMPLATE,
    tokenizer_class="Qwen2TokenizerFast",
)


def qwen_processor(processor_class, video_processor_class, tokenizer, patch_size: int, min_pixels: int,
                   max_pixels: int):
    """A Qwen-VL-style processor: images resized into [min_pixels, max_pixels], cut into `patch_size` patches,
    merged 2x2. The Qwen processors refuse to build without a video processor (it needs torchvision)."""
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor_class(patch_size=patch_size),
        chat_template=tokenizer.chat_template,
    )


def mrope_section(rotary_dim: int, spatial_share: float) -> list[int]:
    """mRoPE's split of the rotary_dim / 2 frequencies over (temporal, height, width): `spatial_share` of
    them each to height and width, the rest to time. The sections must sum to rotary_dim / 2."""
    half = rotary_dim // 2
    spatial = int(half * spatial_share)
    return [half - 2 * spatial, spatial, spatial]


def qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen2_text(tokenizer, hidden_size: int, num_layers: int) -> dict:
    """The Qwen2-VL / Qwen2.5-VL language model: a Qwen2 with 3-D mRoPE, 3/8 of the frequencies each to
    height and width."""
    heads = 4
    head_dim = hidden_size // heads
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        layer_types=["full_attention"] * num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": mrope_section(head_dim, 3 / 8)},
        tie_word_embeddings=True,
        **special_ids(tokenizer, QWEN_FORMAT),
    )


def qwen2_5_vl_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, vision_depth: int = 2):
    """A Qwen2.5-VL config a few hundred thousand parameters large, wired to `tokenizer`'s ids."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=_qwen2_text(tokenizer, hidden_size, num_layers),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        **qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )


def qwen2_5_vl_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """A Qwen2.5-VL processor around `tokenizer` with an image budget of [min_pixels, max_pixels]."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    return qwen_processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, tokenizer, 14, min_pixels, max_pixels)


def _tiny_qwen2_5_vl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # The processor returns input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw;
    # positions are 3-row mRoPE from model.model.get_rope_index.
    config = qwen2_5_vl_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    return config, qwen2_5_vl_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)


def _tiny_qwen2_vl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # Qwen2.5-VL's config without window attention (Qwen2-VL's tower attends over the whole image) and
    # with an MLP ratio instead of an intermediate size; the vision embed_dim differs from the merger's out
    # `hidden_size`. Same processor outputs as Qwen2.5-VL (mm_token_type_ids, image_grid_thw).
    from transformers import Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor

    config = Qwen2VLConfig(
        text_config=_qwen2_text(tokenizer, hidden_size, num_layers),
        vision_config=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return config, qwen_processor(Qwen2VLProcessor, Qwen2VLVideoProcessor, tokenizer, 14, min_pixels, max_pixels)


TINY_MODELS = {
    "qwen2_vl": TinyModel(QWEN_FORMAT, _tiny_qwen2_vl),
    "qwen2_5_vl": TinyModel(QWEN_FORMAT, _tiny_qwen2_5_vl),
}
