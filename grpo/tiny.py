"""A tiny Qwen2.5-VL and its processor, built offline (random weights, no hub download).

Tests and the CPU demo use it; it has the real architecture (vision tower with window attention,
patch merger, 3-D mRoPE language model), only small. Real checkpoints go through `load_model`, the
same path the trainer uses for a name or a local directory.
"""

from __future__ import annotations

import os
import tempfile

import torch

# Special tokens of the Qwen2.5-VL chat format, plus the reasoning tags of the R1-style prompt.
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

# Qwen2-VL's chat template, reduced to what image + text conversations need.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT_CORPUS = [
    "You are a pathology assistant. Look at the image and answer the multiple-choice question.",
    "What is the most likely diagnosis? A) Adenocarcinoma B) Squamous cell carcinoma C) Lymphoma D) Normal tissue",
    "The H&E-stained tile shows crowded nuclei with scant stroma, so options A and B do not fit.",
    "Reason step by step inside <think> </think>, then give the option letter and text inside <answer> </answer>.",
]


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE on `corpus` and wrap it as a Qwen2 fast tokenizer with the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    texts = list(corpus or []) + _DEFAULT_CORPUS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + REASONING_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        bpe.save(path)
        tokenizer = Qwen2TokenizerFast(
            tokenizer_file=path,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            bos_token=None,
        )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + REASONING_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """A Qwen2.5-VL processor around `tokenizer` with an image budget of [min_pixels, max_pixels]."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, vision_depth: int = 2):
    """A Qwen2.5-VL config a few hundred thousand parameters large, wired to `tokenizer`'s ids."""
    from transformers import Qwen2_5_VLConfig

    heads = 4
    head_dim = hidden_size // heads
    # mRoPE splits head_dim / 2 rotary frequencies over (temporal, height, width).
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            layer_types=["full_attention"] * num_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            tie_word_embeddings=True,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
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
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_model_and_processor(
    corpus: list[str] | None = None,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
):
    """Build a random-weight tiny Qwen2.5-VL and its processor, deterministically from `seed`.

    `corpus` (optional) is text the tokenizer is trained on, so a toy task's words become few tokens.
    """
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=vocab_size)
    processor = build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
    config = tiny_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    return model_from_config(config, seed), processor


def model_from_config(config, seed: int):
    """A random-weight Qwen2.5-VL from `config`, the same weights for the same seed, the global RNG untouched."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model
