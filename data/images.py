"""Images that are opened only when a batch needs them, converted to RGB and sized to a pixel budget.

A dataset row holds a `LazyImage`: the absolute path as a string (so rows stay JSON-friendly and any
code that takes a path, a judge reward for instance, works unchanged) that also knows its pixel budget.
The trainer opens it through the duck-typed protocol of `grpo.rollout.load_image`: an object with an
`open_image()` method returning a PIL image. Memory holds only the images of the current batch.

Why resize here when the Qwen2.5-VL processor resizes too: the number of image tokens is
pixels / (28 * 28), and the paper caps the whole prompt at 1024 tokens. Resizing at the source keeps
every prompt under the cap whatever the processor's own (much larger) default budget is, and the
image the judge sees is the one the policy saw.
"""

from __future__ import annotations

import io
import math
import os

from PIL import Image

# One visual token of Qwen2.5-VL covers a 28 x 28 patch (14-pixel patches merged 2 x 2).
PATCH = 28
# At most 512 visual tokens: with the system prompt, question, options and instruction (~300 tokens
# for PathMMU) a prompt stays under the paper's 1024-token limit.
DEFAULT_MAX_PIXELS = 512 * PATCH * PATCH
DEFAULT_MIN_PIXELS = 4 * PATCH * PATCH  # the processor's own minimum


def fit_to_budget(width: int, height: int, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                  factor: int = PATCH) -> tuple[int, int]:
    """(width, height) with both sides multiples of `factor`, aspect ratio kept as well as the rounding
    allows, and width * height within [min_pixels, max_pixels]."""
    if min_pixels > max_pixels or max_pixels < factor * factor:
        raise ValueError(f"need {factor * factor} <= max_pixels and min_pixels <= max_pixels; got {min_pixels}, {max_pixels}")
    w = max(factor, round(width / factor) * factor)
    h = max(factor, round(height / factor) * factor)
    if w * h > max_pixels:
        shrink = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / shrink / factor) * factor)
        h = max(factor, math.floor(height / shrink / factor) * factor)
    elif w * h < min_pixels:
        grow = math.sqrt(min_pixels / (width * height))
        w = math.ceil(width * grow / factor) * factor
        h = math.ceil(height * grow / factor) * factor
    return w, h


class LazyImage(str):
    """An image path (the string value is the absolute path) opened and resized on `open_image()`."""

    min_pixels: int
    max_pixels: int

    def __new__(cls, path: str, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS):
        image = super().__new__(cls, os.path.abspath(os.fspath(path)))
        image.min_pixels, image.max_pixels = min_pixels, max_pixels
        return image

    def __getnewargs__(self):  # pickling (dataloader workers, deepcopy) keeps the budget
        return str(self), self.min_pixels, self.max_pixels

    def __repr__(self) -> str:
        return f"LazyImage({str(self)!r}, min_pixels={self.min_pixels}, max_pixels={self.max_pixels})"

    def open_image(self) -> Image.Image:
        return open_within_budget(str(self), self.min_pixels, self.max_pixels)


class EncodedImage(bytes):
    """An image file's bytes held in memory (a parquet row's image), decoded and sized on `open_image()`.

    `name` (the file name the release stored with the bytes, or where the bytes came from) is what
    its repr and error messages show, never the bytes.
    """

    name: str
    min_pixels: int
    max_pixels: int

    def __new__(cls, data: bytes, name: str = "", min_pixels: int = DEFAULT_MIN_PIXELS,
                max_pixels: int = DEFAULT_MAX_PIXELS):
        image = super().__new__(cls, data)
        image.name, image.min_pixels, image.max_pixels = name, min_pixels, max_pixels
        return image

    def __getnewargs__(self):
        return bytes(self), self.name, self.min_pixels, self.max_pixels

    def __repr__(self) -> str:
        return f"EncodedImage({self.name!r}, {len(self)} bytes, min_pixels={self.min_pixels}, max_pixels={self.max_pixels})"

    def open_image(self) -> Image.Image:
        return open_within_budget(io.BytesIO(self), self.min_pixels, self.max_pixels)


def open_within_budget(source, min_pixels: int, max_pixels: int) -> Image.Image:
    """The image at `source` (a path or a file object) as RGB, resized to fit the pixel budget."""
    with Image.open(source) as image:
        image = image.convert("RGB")
    size = fit_to_budget(*image.size, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def check_image(source: str | bytes) -> str | None:
    """None when `source` (a path, or an image file's bytes) is a readable image, else why not
    (missing file, unreadable or corrupt data)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif not os.path.isfile(source):
        return "image file not found"
    try:
        # verify() checks the file's structure and checksums without decoding all pixels; it leaves
        # the image unusable, which is fine: rows open their images again later.
        with Image.open(source) as image:
            image.verify()
    except Exception as error:  # PIL raises several types for corrupt files
        return f"cannot read image ({type(error).__name__}: {error})"
    return None
