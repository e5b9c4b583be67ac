"""Tiny random-weight vision-language models and their processors, built offline (no hub download).

Tests and the CPU demo use them. Each family (`FAMILIES`, named by its transformers `model_type`) is the
real architecture, only small: the Qwen-VL vision towers (window attention, patch merger, DeepStack)
with 3-D mRoPE language models, Qwen3.5's hybrid linear/full-attention model, Gemma 3 with SigLIP and
sliding-window layers, InternVL with tiled images and pixel shuffle. The default, Qwen2.5-VL, is the
model the demo trains. Every tokenizer is a byte-level BPE trained in-process on a small corpus, with
the family's special tokens and chat format. What is particular to a family (its chat format, config
and processor) lives in its module in grpo/models (`TINY_MODELS`); this module trains the tokenizer
and seeds the weights. Real checkpoints go through `load_model`, the same path the trainer uses for
a name or a local directory.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .models import TINY_MODELS
from .models.tiny_parts import ChatFormat

FAMILIES = tuple(TINY_MODELS)  # transformers model_type names, in the registry's order
DEFAULT_FAMILY = "qwen2_5_vl"

# The reasoning tags of the R1-style prompt, which every family's tokenizer gets after its special tokens.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

_DEFAULT_CORPUS = [
    "You are a pathology assistant. Look at the image and answer the multiple-choice question.",
    "What is the most likely diagnosis? A) Adenocarcinoma B) Squamous cell carcinoma C) Lymphoma D) Normal tissue",
    "The H&E-stained tile shows crowded nuclei with scant stroma, so options A and B do not fit.",
    "Reason step by step inside <think> </think>, then give the option letter and text inside <answer> </answer>.",
]


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512, chat_format: ChatFormat | None = None):
    """Train a byte-level BPE on `corpus` and wrap it as `chat_format`'s tokenizer (the default family's
    when None), with its special tokens, the reasoning tags and its chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    chat_format = chat_format or TINY_MODELS[DEFAULT_FAMILY].chat_format
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


def build_tiny_model_and_processor(
    corpus: list[str] | None = None,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    family: str = DEFAULT_FAMILY,
):
    """Build a random-weight tiny model of `family` (one of FAMILIES) and its processor, deterministically
    from `seed`.

    `corpus` (optional) is text the tokenizer is trained on, so a toy task's words become few tokens.
    `min_pixels` / `max_pixels` bound the image size of the Qwen families (Gemma 3 and InternVL resize to
    their fixed tile).
    """
    if family not in TINY_MODELS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tiny = TINY_MODELS[family]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=vocab_size, chat_format=tiny.chat_format)
    config, processor = tiny.build(tokenizer, hidden_size, num_layers, min_pixels, max_pixels)
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
