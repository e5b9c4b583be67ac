"""InternVL (the `-hf` checkpoints, `InternVLForConditionalGeneration`): images cut into 448-px
tiles plus a thumbnail, a fixed number of `<IMG_CONTEXT>` tokens per tile after pixel shuffle,
1-D positions. The original checkpoints use remote code and another class; they run on the plain
path as any model of no known family does.
"""

from __future__ import annotations

from .base import inner_model
from .pooled import PooledFeaturesFamily
from .tiny_parts import ChatFormat, TinyModel, chatml_template, special_ids


class InternVLFamily(PooledFeaturesFamily):
    name = "internvl"
    model_types = ("internvl",)
    packs_groups = True

    def _vision_output(self, model, pixel_values):
        config = inner_model(model).config
        return inner_model(model).get_image_features(
            pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True)


FAMILY = InternVLFamily

# ---------------------------------------------------------------- tiny model (grpo/tiny.py)

INTERNVL_FORMAT = ChatFormat(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    pad_token="<|endoftext|>",
    eos_token="<|im_end|>",
    end_of_turn=("<|im_end|>",),
    chat_template=chatml_template("<IMG_CONTEXT>\n"),
    tokenizer_class="Qwen2TokenizerFast",
    named_tokens={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"},
)

TILE, MAX_TILES = 28, 4  # 2x2 patches of 14 per tile, pixel-shuffled to 1 token


def _tiny_internvl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # The -hf layout: InternViT + pixel shuffle (downsample_ratio 0.5) + MLP projector + a Qwen2 LM,
    # 1-D positions. The processor cuts an image into up to MAX_TILES tiles plus a thumbnail (a 56x56
    # image: 2x2 tiles + thumbnail = 5 tiles), each image_seq_length <IMG_CONTEXT> tokens between <img>
    # and </img>; it returns input_ids, attention_mask, pixel_values (one row per tile), no token-type
    # row, and pads on the LEFT by default (its text_kwargs). min_pixels / max_pixels are unused. The
    # tokenizer must name start/end/context image tokens and a video token; the processor refuses to
    # build without a video processor.
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    downsample_ratio, patch = 0.5, 14
    image_seq_length = int((TILE // patch) ** 2 * downsample_ratio**2)
    heads = 4
    config = InternVLConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
            intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            layer_types=["full_attention"] * num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=4096, tie_word_embeddings=True,
            **special_ids(tokenizer, INTERNVL_FORMAT),
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=patch),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        tie_word_embeddings=True,
    )
    image_processor = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE},
                                            crop_to_patches=True, min_patches=1, max_patches=MAX_TILES)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=image_seq_length,
                                  chat_template=tokenizer.chat_template)
    return config, processor


TINY_MODELS = {"internvl": TinyModel(INTERNVL_FORMAT, _tiny_internvl)}
