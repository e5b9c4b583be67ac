"""Tiny random-weight vision-language models and their processors, built offline (no hub download).

Tests and the CPU demo use them. Each family (`FAMILIES`, named by its transformers `model_type`) is the
real architecture, only small: the Qwen-VL vision towers (window attention, patch merger, DeepStack)
with 3-D mRoPE language models, Qwen3.5's hybrid linear/full-attention model, Gemma 3 with SigLIP and
sliding-window layers, InternVL with tiled images and pixel shuffle. The default, Qwen2.5-VL, is the
model the demo trains. Every tokenizer is a byte-level BPE trained in-process on a small corpus, with
the family's special tokens and chat format. Real checkpoints go through `load_model`, the same path
the trainer uses for a name or a local directory.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch

# Special tokens of the Qwen-VL chat format (the pad token first), plus the reasoning tags of the
# R1-style prompt, which every family's tokenizer gets.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def chatml_template(image_part: str) -> str:
    """The ChatML template of the Qwen and InternVL families, reduced to image + text conversations;
    `image_part` is what an image content part renders as (the processor expands it to the image's tokens)."""
    return (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or 'image' in part %}" + image_part +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Qwen2-VL's chat template (also Qwen2.5-VL's, Qwen3-VL's and, without its thinking switch, Qwen3.5's).
CHAT_TEMPLATE = chatml_template("<|vision_start|><|image_pad|><|vision_end|>")

# Gemma 3's chat template, reduced the same way: a system message is merged into the first user turn,
# the assistant speaks as "model", and an image is `<start_of_image>`, which the processor expands to
# the soft tokens between begin- and end-of-image.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ first_user_prefix if loop.first else '' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A family's tokens and chat template: what the tokenizer builder needs to know about it."""

    special_tokens: tuple[str, ...]  # trained into the vocabulary first, in this order (so their ids are fixed)
    pad_token: str
    eos_token: str
    end_of_turn: tuple[str, ...]  # generation stops at any of these
    chat_template: str
    tokenizer_class: str  # the transformers class wrapping the trained BPE
    bos_token: str | None = None
    named_tokens: dict[str, str] = field(default_factory=dict)  # e.g. boi_token: read by the family's processor


QWEN_FORMAT = ChatFormat(
    special_tokens=tuple(SPECIAL_TOKENS),
    pad_token="<|endoftext|>",
    eos_token="<|im_end|>",
    end_of_turn=("<|im_end|>",),
    chat_template=CHAT_TEMPLATE,
    tokenizer_class="Qwen2TokenizerFast",
)

GEMMA3_FORMAT = ChatFormat(
    special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                    "<end_of_image>", "<image_soft_token>"),
    pad_token="<pad>",
    eos_token="<eos>",
    bos_token="<bos>",
    end_of_turn=("<end_of_turn>", "<eos>"),
    chat_template=GEMMA3_CHAT_TEMPLATE,
    # Not GemmaTokenizer: its loader rebuilds a SentencePiece-style pipeline around the saved vocabulary,
    # and a reloaded (save_pretrained / from_pretrained) byte-level BPE then fails to tokenize ("Unk token").
    tokenizer_class="PreTrainedTokenizerFast",
    named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
)

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

_DEFAULT_CORPUS = [
    "You are a pathology assistant. Look at the image and answer the multiple-choice question.",
    "What is the most likely diagnosis? A) Adenocarcinoma B) Squamous cell carcinoma C) Lymphoma D) Normal tissue",
    "The H&E-stained tile shows crowded nuclei with scant stroma, so options A and B do not fit.",
    "Reason step by step inside <think> </think>, then give the option letter and text inside <answer> </answer>.",
]


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512, chat_format: ChatFormat = QWEN_FORMAT):
    """Train a byte-level BPE on `corpus` and wrap it as `chat_format`'s tokenizer, with its special tokens,
    the reasoning tags and its chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(chat_format.special_tokens) + REASONING_TOKENS
    texts = list(corpus or []) + _DEFAULT_CORPUS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        bpe.save(path)
        tokenizer = getattr(transformers, chat_format.tokenizer_class)(
            tokenizer_file=path,
            eos_token=chat_format.eos_token,
            pad_token=chat_format.pad_token,
            unk_token=None,
            bos_token=chat_format.bos_token,
            **chat_format.named_tokens,
        )
    # As in the Qwen tokenizers, every special token but the pad is listed as an extra special token.
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t != chat_format.pad_token]})
    tokenizer.chat_template = chat_format.chat_template
    return tokenizer


def build_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """A Qwen2.5-VL processor around `tokenizer` with an image budget of [min_pixels, max_pixels]."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    return _qwen_processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, tokenizer, 14, min_pixels, max_pixels)


def _qwen_processor(processor_class, video_processor_class, tokenizer, patch_size: int, min_pixels: int,
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


def _mrope_section(rotary_dim: int, spatial_share: float) -> list[int]:
    """mRoPE's split of the rotary_dim / 2 frequencies over (temporal, height, width): `spatial_share` of
    them each to height and width, the rest to time. The sections must sum to rotary_dim / 2."""
    half = rotary_dim // 2
    spatial = int(half * spatial_share)
    return [half - 2 * spatial, spatial, spatial]


def _qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _special_ids(tokenizer, chat_format: ChatFormat) -> dict:
    """bos/eos/pad ids for a text config; eos is the end-of-turn id (a list where the family has several)."""
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in chat_format.end_of_turn]
    bos = chat_format.bos_token or chat_format.pad_token
    return dict(bos_token_id=tokenizer.convert_tokens_to_ids(bos),
                eos_token_id=end_ids[0] if len(end_ids) == 1 else end_ids,
                pad_token_id=tokenizer.convert_tokens_to_ids(chat_format.pad_token))


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
                         "mrope_section": _mrope_section(head_dim, 3 / 8)},
        tie_word_embeddings=True,
        **_special_ids(tokenizer, QWEN_FORMAT),
    )


def tiny_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, vision_depth: int = 2):
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
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )


# One builder per family: (tokenizer, hidden_size, num_layers, min_pixels, max_pixels) -> (config, processor).
# min_pixels / max_pixels are the image budget of the Qwen families; Gemma 3 and InternVL resize every
# image to their fixed tile size.


def _qwen2_5_vl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # The processor returns input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw;
    # positions are 3-row mRoPE from model.model.get_rope_index.
    config = tiny_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    return config, build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)


def _qwen2_vl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # Qwen2.5-VL's config without window attention (Qwen2-VL's tower attends over the whole image) and
    # with an MLP ratio instead of an intermediate size; the vision embed_dim differs from the merger's out
    # `hidden_size`. Same processor outputs as Qwen2.5-VL (mm_token_type_ids, image_grid_thw).
    from transformers import Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor

    config = Qwen2VLConfig(
        text_config=_qwen2_text(tokenizer, hidden_size, num_layers),
        vision_config=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return config, _qwen_processor(Qwen2VLProcessor, Qwen2VLVideoProcessor, tokenizer, 14, min_pixels, max_pixels)


def _qwen3_vision(hidden_size: int, **extra) -> dict:
    """The Qwen3-VL / Qwen3.5 vision tower: 16-px patches merged 2x2, learned position embeddings on a
    square grid (interpolated to the image's), 2 blocks."""
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, **extra)


def _qwen3_vl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
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
                             "mrope_section": _mrope_section(head_dim, 5 / 16), "mrope_interleaved": True},
            **_special_ids(tokenizer, QWEN_FORMAT),
        ),
        vision_config=_qwen3_vision(hidden_size, deepstack_visual_indexes=[0]),
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return config, _qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, min_pixels, max_pixels)


def _qwen3_5(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # Hybrid: layer_types alternate Gated DeltaNet ("linear_attention": conv + recurrent state in the cache,
    # a LinearAttentionLayer without batch_select_indices) and gated "full_attention" (every 4th layer in
    # the real models, every 2nd here). Rotary on a quarter of each head (partial_rotary_factor 0.25), so
    # mrope_section sums to head_dim / 8. Its processor is Qwen3VLProcessor (the auto mapping's choice;
    # returns mm_token_type_ids), its vision tower Qwen3-VL's without DeepStack. A saved processor
    # reloads with Qwen3_5Tokenizer (transformers forces that class for qwen3_5; same ids on our text).
    # Without causal_conv1d / flash-linear-attention the linear layers run pure-torch kernels (warned).
    from transformers import Qwen3_5Config, Qwen3VLProcessor, Qwen3VLVideoProcessor

    if num_layers < 2:
        raise ValueError(f"qwen3_5 needs num_layers >= 2 (a linear- and a full-attention layer), got {num_layers}")
    heads, head_dim, rotary_share = 4, 32, 0.25
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_share,
                             "mrope_section": _mrope_section(int(head_dim * rotary_share), 5 / 16),
                             "mrope_interleaved": True},
            tie_word_embeddings=True,
            **_special_ids(tokenizer, QWEN_FORMAT),
        ),
        vision_config=_qwen3_vision(hidden_size),
        **_qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return config, _qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, min_pixels, max_pixels)


GEMMA3_IMAGE_SIZE, GEMMA3_TOKENS_PER_IMAGE = 56, 4  # SigLIP on 56x56 px (4x4 patches of 14), pooled to 2x2


def _gemma3(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # Plain 1-D positions (no get_rope_index). Gemma3Processor renames its mm_token_type_ids to
    # token_type_ids (1 on the soft image tokens), which switch on bidirectional attention inside each
    # image; it returns input_ids, attention_mask, token_type_ids, pixel_values. In transformers 5.24 a
    # forward over an image without token_type_ids runs (train mode too) but gives other logits: pass
    # them to every forward over a prompt, the completion's included (a forward continuing a cached
    # prompt needs none: grpo/models/gemma3.py). The processor wants one list of images per prompt (a
    # flat list is read as all images of one prompt) and expands each <start_of_image> to
    # "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n". The tokenizer must name boi_token /
    # eoi_token / image_token.
    # Layers alternate sliding (window 8) and full attention, so the window masks prompts of ~40 tokens.
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    heads = 4
    head_dim = hidden_size // heads
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            sliding_window=8, max_position_embeddings=4096,
            **_special_ids(tokenizer, GEMMA3_FORMAT),
        ),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=GEMMA3_IMAGE_SIZE,
                           patch_size=14, vision_use_head=False),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    image_processor = Gemma3ImageProcessor(size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=tokenizer.chat_template, image_seq_length=GEMMA3_TOKENS_PER_IMAGE)
    return config, processor


INTERNVL_TILE, INTERNVL_MAX_TILES = 28, 4  # 2x2 patches of 14 per tile, pixel-shuffled to 1 token


def _internvl(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # The -hf layout: InternViT + pixel shuffle (downsample_ratio 0.5) + MLP projector + a Qwen2 LM,
    # 1-D positions. The processor cuts an image into up to INTERNVL_MAX_TILES tiles plus a thumbnail
    # (a 56x56 image: 2x2 tiles + thumbnail = 5 tiles), each image_seq_length <IMG_CONTEXT> tokens between
    # <img> and </img>; it returns input_ids, attention_mask, pixel_values (one row per tile), no
    # token-type row, and pads on the LEFT by default (its text_kwargs). The tokenizer must name
    # start/end/context image tokens and a video token; the processor refuses to build without a video
    # processor.
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    downsample_ratio, patch = 0.5, 14
    image_seq_length = int((INTERNVL_TILE // patch) ** 2 * downsample_ratio**2)
    heads = 4
    config = InternVLConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
            intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            layer_types=["full_attention"] * num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=4096, tie_word_embeddings=True,
            **_special_ids(tokenizer, INTERNVL_FORMAT),
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=INTERNVL_TILE, patch_size=patch),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        tie_word_embeddings=True,
    )
    image_processor = GotOcr2ImageProcessor(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
                                            crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=image_seq_length,
                                  chat_template=tokenizer.chat_template)
    return config, processor


_BUILDERS = {
    "qwen2_vl": (QWEN_FORMAT, _qwen2_vl),
    "qwen2_5_vl": (QWEN_FORMAT, _qwen2_5_vl),
    "qwen3_vl": (QWEN_FORMAT, _qwen3_vl),
    "qwen3_5": (QWEN_FORMAT, _qwen3_5),
    "gemma3": (GEMMA3_FORMAT, _gemma3),
    "internvl": (INTERNVL_FORMAT, _internvl),
}
FAMILIES = tuple(_BUILDERS)  # transformers model_type names


def build_tiny_model_and_processor(
    corpus: list[str] | None = None,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    family: str = "qwen2_5_vl",
):
    """Build a random-weight tiny model of `family` (one of FAMILIES) and its processor, deterministically
    from `seed`.

    `corpus` (optional) is text the tokenizer is trained on, so a toy task's words become few tokens.
    `min_pixels` / `max_pixels` bound the image size of the Qwen families (Gemma 3 and InternVL resize to
    their fixed tile).
    """
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    chat_format, build = _BUILDERS[family]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=vocab_size, chat_format=chat_format)
    config, processor = build(tokenizer, hidden_size, num_layers, min_pixels, max_pixels)
    return model_from_config(config, seed), processor


def model_from_config(config, seed: int):
    """A random-weight model from `config` (any family), the same weights for the same seed, the global RNG
    untouched. Generation stops at the text config's eos id(s), the family's end of turn."""
    from transformers import AutoModelForImageTextToText

    text = config.get_text_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
        # transformers starts Gemma 3's image projection at zero (a pretrained checkpoint replaces it), so a
        # random model's images are all the same to the language model until the projection trains, and a
        # frozen tower (the paper's setting) would keep them invisible. Random, as the rest of the weights.
        for module in model.modules():
            if hasattr(module, "mm_input_projection_weight"):
                torch.nn.init.normal_(module.mm_input_projection_weight, std=text.initializer_range)
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    return model
