"""What a family module declares so that grpo/tiny.py can build a tiny random-weight model of it.

A family module lists its tiny models in `TINY_MODELS` (transformers `model_type` -> `TinyModel`):
the chat format its tokenizer is trained with, and a builder that makes the family's config and
processor around that tokenizer. grpo/tiny.py owns what every family shares: training the tokenizer,
seeding the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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


@dataclass(frozen=True)
class TinyModel:
    """A family's tiny model: its tokenizer's chat format and
    `build(tokenizer, hidden_size, num_layers, min_pixels, max_pixels) -> (config, processor)`.
    min_pixels / max_pixels are the image budget of the families whose processor takes one; the others
    resize every image to their fixed tile size and ignore them."""

    chat_format: ChatFormat
    build: Callable


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


def special_ids(tokenizer, chat_format: ChatFormat) -> dict:
    """bos/eos/pad ids for a text config; eos is the end-of-turn id (a list where the family has several)."""
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in chat_format.end_of_turn]
    bos = chat_format.bos_token or chat_format.pad_token
    return dict(bos_token_id=tokenizer.convert_tokens_to_ids(bos),
                eos_token_id=end_ids[0] if len(end_ids) == 1 else end_ids,
                pad_token_id=tokenizer.convert_tokens_to_ids(chat_format.pad_token))
