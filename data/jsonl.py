"""Your own data: a JSON-lines file of questions about images, one object per line.

    {"id": "case-17", "image": "images/case-17.png", "question": "Which grade is this tumour?",
     "options": ["A) Grade 1", "B) Grade 2", "C) Grade 3"], "solution": "B) Grade 2",
     "explanation": "optional reasoning for SFT"}

`image` is a path relative to the JSONL file (or absolute); several images go in `images` (a list).
`options` is for multiple choice; `answer_type` (optional) says how the row is answered when it is not
multiple choice. `id` defaults to the line number. Any other field is kept: reward functions get it as
a column, and an SFT run trains on a row's `completion` when it has one.
"""

from __future__ import annotations

import json
import os

from data.images import PATCH, ImageBudget
from data.items import ItemChecker, Rows, resolve


def load_jsonl(path: str, on_bad_item: str = "error", min_pixels: int | None = None, max_pixels: int | None = None,
               verify_images: bool = True, max_visual_tokens: int | None = None,
               image_token_pixels: int | None = PATCH) -> Rows:
    """The rows of a JSONL file, images as LazyImages (opened and sized to the image budget when used:
    max_visual_tokens of image_token_pixels a side, or [min_pixels, max_pixels]; data.images).

    A bad line (not a JSON object, no question or solution, no image, an image that is missing or
    unreadable, a repeated id) raises ValueError naming the file, the line and the field; with
    on_bad_item="skip" it is left out and counted in the returned list's `skipped`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: JSONL file not found")
    root = os.path.dirname(os.path.abspath(path))
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows, ids = [], set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                checker.add(rows, lambda: _row(line, number, root, path, checker, ids))
    return checker.finish(rows, path)


def _row(line: str, number: int, root: str, path: str, checker: ItemChecker, ids: set) -> dict:
    where = f"line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        checker.fail(path, where, "(the line)", f"not valid JSON: {error}")
    checker.require(item, path, where, ("question", "solution"))
    row = dict(item)
    row["id"] = item.get("id", number)
    if row["id"] in ids:
        checker.fail(path, where, "id", f"{row['id']!r} is already the id of an earlier line")
    if item.get("images") is not None:
        if not isinstance(item["images"], list) or not item["images"]:
            checker.fail(path, where, "images", f"expected a non-empty list of image paths, got {item['images']!r}")
        row["images"] = [checker.image(resolve(root, image), path, where, "images") for image in item["images"]]
    elif item.get("image"):
        row["image"] = checker.image(resolve(root, item["image"]), path, where, "image")
    else:
        checker.fail(path, where, "image", "missing: give `image` (a path) or `images` (a list of paths)")
    ids.add(row["id"])
    return row
