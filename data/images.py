"""Images that are opened only when a batch needs them, converted to RGB and sized to a budget of
visual tokens.

A dataset row holds a `LazyImage`: the absolute path as a string (so rows stay JSON-friendly and any
code that takes a path, a judge reward for instance, works unchanged) that also knows its budget.
The trainer opens it through the duck-typed protocol of `grpo.prompts.load_image`: an object with an
`open_image()` method returning a PIL image. Memory holds only the images of the current batch.

Why resize here when the processor resizes too: a Qwen-VL processor cuts an image into squares of
`factor` pixels a side, one visual token each (14-px patches merged 2x2 = 28 px for Qwen2/2.5-VL,
16-px patches merged 2x2 = 32 px for Qwen3-VL and Qwen3.5), and the paper caps the whole prompt at
1024 tokens. Resizing at the source keeps every prompt under the cap whatever the processor's own
(much larger) default budget is, and the image the judge sees is the one the policy saw.

The budget (`ImageBudget`) is counted in visual tokens, so it means the same on every family: at most
`max_visual_tokens` (default 512, the paper's on Qwen2.5-VL: 512 * 28 * 28 px) and at least
MIN_VISUAL_TOKENS, i.e. pixels = tokens * factor**2, with both sides multiples of `factor`. An image
sized so reaches the processor already on its grid, and the processor leaves it as it is. `min_pixels`
/ `max_pixels` give the budget in pixels instead. `factor` is the model's: the loaders take it as
`image_token_pixels` (grpo's `Family.image_token_pixels(processor)` reads it from the processor;
the command line passes it), default 28. None means the processor sizes images its own way (Gemma 3:
one fixed square; InternVL: tiles): images are then not resized here at all, whatever the budget
says, since any resize here would be a second one. The processor's own limits still apply: the
Qwen3-VL and Qwen3.5 checkpoints enlarge images under 256 x 256 px (64 visual tokens) themselves.
`size_images_for` re-sizes rows loaded once for another model (an evaluation of several models).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, replace

from PIL import Image

# One visual token of Qwen2.5-VL covers a 28 x 28 patch (14-pixel patches merged 2 x 2): the default.
PATCH = 28
# At most 512 visual tokens: with the system prompt, question, options and instruction (~300 tokens
# for PathMMU) a prompt stays under the paper's 1024-token limit.
MAX_VISUAL_TOKENS = 512
MIN_VISUAL_TOKENS = 4  # Qwen2.5-VL's processor's own minimum (56 x 56 px)
# The default budget on Qwen2.5-VL, in pixels.
DEFAULT_MAX_PIXELS = MAX_VISUAL_TOKENS * PATCH * PATCH
DEFAULT_MIN_PIXELS = MIN_VISUAL_TOKENS * PATCH * PATCH


def fit_to_budget(width: int, height: int, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                  factor: int | None = PATCH) -> tuple[int, int]:
    """(width, height) with both sides multiples of `factor`, aspect ratio kept as well as the rounding
    allows, and width * height within [min_pixels, max_pixels]. `factor` None: unchanged."""
    if factor is None:
        return width, height
    _check_range(min_pixels, max_pixels, factor)
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


def _check_range(min_pixels: int, max_pixels: int, factor: int) -> None:
    if min_pixels > max_pixels or max_pixels < factor * factor:
        raise ValueError(f"need {factor * factor} (one visual token of {factor} x {factor} px) <= max_pixels and "
                         f"min_pixels <= max_pixels; got min_pixels {min_pixels}, max_pixels {max_pixels}")


@dataclass(frozen=True)
class ImageBudget:
    """How an image is sized before the model's processor sees it (the module docstring says why)."""

    factor: int | None = PATCH  # the model's pixels per visual token (a side); None: the processor sizes images
    max_visual_tokens: int | None = None  # None: MAX_VISUAL_TOKENS, unless max_pixels is given
    min_pixels: int | None = None  # the budget in pixels instead; None: MIN_VISUAL_TOKENS tokens (or the maximum)
    max_pixels: int | None = None  # the budget in pixels instead of max_visual_tokens

    def __post_init__(self):
        if self.max_visual_tokens is not None and self.max_pixels is not None:
            raise ValueError(f"give max_visual_tokens ({self.max_visual_tokens}) or max_pixels ({self.max_pixels}), "
                             f"not both: they are the same limit, in tokens or in pixels")
        factor = self.factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int) or factor < 1):
            raise ValueError(f"image_token_pixels must be a positive whole number of pixels or None, got {factor!r}")
        if self.max_visual_tokens is not None and self.max_visual_tokens < 1:
            raise ValueError(f"max_visual_tokens must be at least 1, got {self.max_visual_tokens}")
        if factor is not None:
            _check_range(*self.pixel_range(), factor)

    def pixel_range(self) -> tuple[int, int] | None:
        """(min_pixels, max_pixels) an image is fitted into; None when images are not resized."""
        if self.factor is None:
            return None
        token = self.factor * self.factor
        high = self.max_pixels if self.max_pixels is not None else (self.max_visual_tokens or MAX_VISUAL_TOKENS) * token
        low = self.min_pixels if self.min_pixels is not None else min(MIN_VISUAL_TOKENS * token, high)
        return low, high

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of (width, height) is given."""
        limits = self.pixel_range()
        return (width, height) if limits is None else fit_to_budget(width, height, *limits, self.factor)

    def open(self, source) -> Image.Image:
        """The image at `source` (a path or a file object) as RGB, resized to fit the budget."""
        with Image.open(source) as image:
            image = image.convert("RGB")
        size = self.size_for(*image.size)
        return image if size == image.size else image.resize(size, Image.BICUBIC)


class LazyImage(str):
    """An image path (the string value is the absolute path) opened and sized to its `budget` on `open_image()`."""

    budget: ImageBudget

    def __new__(cls, path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                factor: int | None = PATCH, max_visual_tokens: int | None = None):
        return cls.with_budget(path, ImageBudget(factor, max_visual_tokens, min_pixels, max_pixels))

    @classmethod
    def with_budget(cls, path, budget: ImageBudget) -> LazyImage:
        image = super().__new__(cls, os.path.abspath(os.fspath(path)))
        image.budget = budget
        return image

    def __reduce__(self):  # pickling (dataloader workers, deepcopy) keeps the budget
        return type(self).with_budget, (str(self), self.budget)

    def __repr__(self) -> str:
        return f"LazyImage({str(self)!r}, {_describe(self.budget)})"

    @property
    def min_pixels(self) -> int | None:
        return (self.budget.pixel_range() or (None, None))[0]

    @property
    def max_pixels(self) -> int | None:
        return (self.budget.pixel_range() or (None, None))[1]

    def with_factor(self, factor: int | None) -> LazyImage:
        """The same image and budget, sized for a model with `factor` pixels per visual token."""
        return type(self).with_budget(str(self), replace(self.budget, factor=factor))

    def open_image(self) -> Image.Image:
        return self.budget.open(str(self))


class EncodedImage(bytes):
    """An image file's bytes held in memory (a parquet row's image), decoded and sized on `open_image()`.

    `name` (the file name the release stored with the bytes, or where the bytes came from) is what
    its repr and error messages show, never the bytes.
    """

    name: str
    budget: ImageBudget

    def __new__(cls, data: bytes, name: str = "", min_pixels: int | None = None, max_pixels: int | None = None,
                factor: int | None = PATCH, max_visual_tokens: int | None = None):
        return cls.with_budget(data, name, ImageBudget(factor, max_visual_tokens, min_pixels, max_pixels))

    @classmethod
    def with_budget(cls, data: bytes, name: str, budget: ImageBudget) -> EncodedImage:
        image = super().__new__(cls, data)
        image.name, image.budget = name, budget
        return image

    def __reduce__(self):
        return type(self).with_budget, (bytes(self), self.name, self.budget)

    def __repr__(self) -> str:
        return f"EncodedImage({self.name!r}, {len(self)} bytes, {_describe(self.budget)})"

    def with_factor(self, factor: int | None) -> EncodedImage:
        """The same image and budget, sized for a model with `factor` pixels per visual token."""
        return type(self).with_budget(bytes(self), self.name, replace(self.budget, factor=factor))

    def open_image(self) -> Image.Image:
        return self.budget.open(io.BytesIO(self))


def _describe(budget: ImageBudget) -> str:
    limits = budget.pixel_range()
    if limits is None:
        return "not resized"
    return f"min_pixels={limits[0]}, max_pixels={limits[1]}, factor={budget.factor}"


def size_images_for(rows: list[dict], image_token_pixels: int | None) -> list[dict]:
    """Copies of `rows` whose lazy images (`image`, `images`) are sized for a model with
    `image_token_pixels` pixels per visual token (None: left to its processor), each budget otherwise
    as loaded: for rows loaded once and used with several models. Other images (PIL images, plain
    paths) are left as they are."""

    def resized(image):
        return image.with_factor(image_token_pixels) if isinstance(image, (LazyImage, EncodedImage)) else image

    out = []
    for row in rows:
        row = dict(row)
        if row.get("image") is not None:
            row["image"] = resized(row["image"])
        if isinstance(row.get("images"), list):
            row["images"] = [resized(image) for image in row["images"]]
        out.append(row)
    return out


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
