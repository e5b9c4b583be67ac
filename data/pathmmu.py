"""PathMMU: `<root>/data.json` (data[subset][split] lists of items) and `<root>/images/<img>`.

An item: {"No": int, "img": "<sha>.png", "question": str, "options": ["A) ...", ...],
"answer": "B) ...", "explanation": str}. Some subsets add fields (tw_id, source_img...) that are
ignored. The paper uses the PubMed and EduContent subsets: 5,385 items once duplicates are removed.
"""

from __future__ import annotations

import json
import os

from data.images import PATCH, ImageBudget
from data.items import ItemChecker, Rows, resolve

PAPER_SUBSETS = ("PubMed", "EduContent")
SPLITS = ("val", "test", "test_tiny")
_REQUIRED = ("No", "img", "question", "options", "answer")


def load_pathmmu(root: str, subsets=PAPER_SUBSETS, splits=SPLITS, on_bad_item: str = "error",
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 verify_images: bool = True, max_visual_tokens: int | None = None,
                 image_token_pixels: int | None = PATCH) -> Rows:
    """Rows of the given subsets and splits, each item once.

    Row fields: id ("<subset>/<split>/<No>"), image (a LazyImage: the absolute path, opened and sized
    to the image budget only when used: data.images), question, options (as in the file, stripped),
    solution (the option the answer names), explanation (str or None), source (the subset), split.
    An item that appears in several splits (same image, same question) is kept at its first
    occurrence in the order of `subsets`, then `splits`.

    A bad item (missing field, options not a list of at least two texts, answer not among the
    options, image missing or unreadable) raises ValueError naming the file, the subset, split and
    item index, and the field; with on_bad_item="skip" it is left out and counted in the returned
    list's `skipped` (one message per item).
    """
    path = os.path.join(root, "data.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PathMMU: {path} not found (expected <root>/data.json and <root>/images/)")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of subsets, got {type(data).__name__}")
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows, seen = [], set()
    for subset in subsets:
        if subset not in data:
            raise ValueError(f"{path}: no subset {subset!r}; the file has {', '.join(data)}")
        for split in splits:
            if split not in data[subset]:
                raise ValueError(f"{path}: subset {subset!r} has no split {split!r}; it has {', '.join(data[subset])}")
            for index, item in enumerate(data[subset][split]):
                where = f"data[{subset!r}][{split!r}] item {index}"
                key = (item.get("img"), " ".join(str(item.get("question")).split())) if isinstance(item, dict) else None
                if key in seen:
                    continue
                size_before = len(rows)
                checker.add(rows, lambda: _row(item, root, path, where, subset, split, checker))
                if len(rows) > size_before:
                    seen.add(key)
    return checker.finish(rows, f"PathMMU {path}")


def _row(item, root, path, where, subset, split, checker: ItemChecker) -> dict:
    checker.require(item, path, where, _REQUIRED)
    options = item["options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        checker.fail(path, where, "options", f"expected a list of at least two option texts, got {options!r}")
    options = [option.strip() for option in options]
    answer = str(item["answer"]).strip()
    if answer not in options:
        checker.fail(path, where, "answer", f"{answer!r} is not one of the options {options}")
    explanation = item.get("explanation")
    return {
        "id": f"{subset}/{split}/{item['No']}",
        "image": checker.image(resolve(root, os.path.join("images", item["img"])), path, where, "img"),
        "question": str(item["question"]).strip(),
        "options": options,
        "solution": answer,
        "explanation": explanation.strip() if isinstance(explanation, str) and explanation.strip() else None,
        "source": subset,
        "split": split,
    }
