"""Rows -> model inputs: images loaded, chat messages rendered, each prompt encoded by the processor,
the batch left-padded. `PromptBatch` carries B prompts through a step (rollout, every log-prob pass),
optionally with each prompt's image features computed once (`grpo.logprobs.with_image_features`).

Each prompt is encoded on its own and the batch padded here, so a prompt's image tensors stay its
own (`image_inputs[i]`) whatever the processor's layout, and any subset of prompts can be forwarded
again (`select`) without re-running the processor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import torch
from PIL import Image

from .models.base import TEXT_KEYS


def load_image(value, row_index: int, field: str = "image") -> Image.Image:
    """A row's image as RGB: a PIL image, a path, a lazy image, or a `{"bytes", "path"}` mapping (a
    `datasets` Image column read without decoding). Errors name the row and the field.

    A lazy image is any object with an `open_image()` method returning a PIL image (for instance
    `data.images.LazyImage`, which also resizes to a pixel budget); it is opened only here, per batch.
    """
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if callable(getattr(value, "open_image", None)):
        try:
            return value.open_image().convert("RGB")
        except Exception as error:
            raise ValueError(f"row {row_index}: field {field!r}: cannot open image {value!r}: {error}") from error
    if isinstance(value, (str, bytes, io.BytesIO)) or hasattr(value, "__fspath__"):
        try:
            with Image.open(value) as image:
                return image.convert("RGB")
        except Exception as error:  # PIL raises several types for unreadable files
            raise ValueError(f"row {row_index}: field {field!r}: cannot read image {value!r}: {error}") from error
    raise ValueError(f"row {row_index}: field {field!r}: expected a PIL image or a path, got {type(value).__name__}")


def column(dataset, name: str) -> list:
    """Every row's field `name` (None where a row lacks it), read without loading the rows' other
    fields where the dataset can: a `datasets.Dataset` reads that one column, decoding no image."""
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        return list(dataset[name]) if name in dataset.column_names else [None] * len(dataset)
    return [dataset[i].get(name) for i in range(len(dataset))]


def row_images(row: dict, row_index: int) -> list[Image.Image]:
    """The images of a row: `image` (one) or `images` (a list); none for a text-only row."""
    if row.get("images") is not None:
        return [load_image(value, row_index, "images") for value in row["images"]]
    if row.get("image") is not None:
        return [load_image(row["image"], row_index)]
    return []


def image_parts(messages) -> int:
    """How many image parts chat messages hold (each needs one image from the row): the parts the
    chat templates render as an image, `{"type": "image"}`, `"image_url"`, or any part with an
    `image` / `image_url` key."""
    return sum(
        1 for message in messages if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and (part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part)
    )


@dataclass
class PromptBatch:
    """B left-padded prompts and their images."""

    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    token_types: torch.Tensor  # [B, P] the family's image-token row (1 on image tokens), zeros if it has none
    image_inputs: list[dict]  # per prompt, the processor's image tensors ({} for a text-only prompt)
    images_per_prompt: list[int]
    # Per prompt, the image features its forward needs, computed once (`with_image_features`); when
    # present, forwards use them instead of running the vision tower on the pixels again.
    image_features: list[tuple[torch.Tensor, ...] | None] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: list[int]) -> PromptBatch:
        """The prompts at `index` (repeats allowed), left padding trimmed to the longest of them."""
        attention_mask = self.attention_mask[index]
        first = int((attention_mask.cumsum(1) == 0).sum(1).min())  # columns that are padding everywhere
        return PromptBatch(
            input_ids=self.input_ids[index, first:],
            attention_mask=attention_mask[:, first:],
            token_types=self.token_types[index, first:],
            image_inputs=[self.image_inputs[i] for i in index],
            images_per_prompt=[self.images_per_prompt[i] for i in index],
            image_features=None if self.image_features is None else [self.image_features[i] for i in index],
        )

    def to(self, device) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.token_types.to(device),
            [{k: v.to(device) for k, v in inputs.items()} for inputs in self.image_inputs], self.images_per_prompt,
            None if self.image_features is None else
            [None if f is None else tuple(t.to(device) for t in f) for f in self.image_features],
        )

    def without_features(self) -> PromptBatch:
        """The same prompts, forwarded from pixels (the vision tower runs again, with gradient if trainable)."""
        return replace(self, image_features=None)

    @property
    def has_images(self) -> bool:
        return any(self.images_per_prompt)

    def pixel_inputs(self) -> dict:
        """The image tensors of every prompt with images, concatenated in prompt order."""
        parts = [inputs for inputs in self.image_inputs if inputs]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}


def encode_prompts(family, rows: list[dict], row_indices: list[int], max_prompt_length: int) -> PromptBatch:
    """Render each row's `prompt` (chat messages) with the chat template and encode it with its images.

    A prompt longer than `max_prompt_length` tokens raises ValueError naming the row: cutting it
    would cut image tokens, so it is the data that must change (fewer pixels, a shorter question).
    """
    encoded, counts = [], []
    for row, index in zip(rows, row_indices):
        if not row.get("prompt"):
            raise ValueError(f"row {index}: missing field 'prompt' (chat messages)")
        text = family.template.render(row["prompt"])
        images = row_images(row, index)
        expected = image_parts(row["prompt"])
        if expected != len(images):
            raise ValueError(f"row {index}: the prompt has {expected} image part(s) but the row's field 'image' / 'images' "
                             f"gives {len(images)} image(s)")
        one = family.encode(text, images)
        length = one["input_ids"].shape[1]
        if length > max_prompt_length:
            raise ValueError(f"row {index}: prompt is {length} tokens, more than max_prompt_length={max_prompt_length}")
        encoded.append(one)
        counts.append(len(images))
    width = max(one["input_ids"].shape[1] for one in encoded)
    input_ids = torch.full((len(encoded), width), family.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    token_types = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, one in enumerate(encoded):
        length = one["input_ids"].shape[1]
        input_ids[i, width - length :] = one["input_ids"][0]
        attention_mask[i, width - length :] = one["attention_mask"][0] if "attention_mask" in one else 1
        token_types[i, width - length :] = family.image_token_row(one)[0]
    image_inputs = [{k: v for k, v in one.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)} if n else {}
                    for one, n in zip(encoded, counts)]
    return PromptBatch(input_ids, attention_mask, token_types, image_inputs, counts)
