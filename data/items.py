"""What the dataset loaders share: the bad-item policy and the row list that reports what was skipped."""

from __future__ import annotations

import logging
import os

from data.images import EncodedImage, ImageBudget, LazyImage, check_image

logger = logging.getLogger("data")

BAD_ITEM_POLICIES = ("error", "skip")


class BadItem(ValueError):
    """One unusable item: the file, the item's place in it, the field and what is wrong."""


class Rows(list):
    """The loaded rows (a plain list), plus `skipped`: one message per item left out by on_bad_item="skip"."""

    def __init__(self, rows=(), skipped=()):
        super().__init__(rows)
        self.skipped = list(skipped)


class ItemChecker:
    """Applies the bad-item policy: "error" raises at the first bad item, "skip" leaves it out and counts it.
    Images it makes get `budget` (data.images.ImageBudget)."""

    def __init__(self, on_bad_item: str, budget: ImageBudget = ImageBudget(), verify_images: bool = True):
        if on_bad_item not in BAD_ITEM_POLICIES:
            raise ValueError(f"on_bad_item must be one of {', '.join(BAD_ITEM_POLICIES)}, got {on_bad_item!r}")
        self.on_bad_item = on_bad_item
        self.budget, self.verify_images = budget, verify_images
        self.skipped: list[str] = []

    @staticmethod
    def fail(file: str, where: str, field: str, problem: str):
        raise BadItem(f"{file}: {where}: field {field!r}: {problem}")

    def require(self, item, file: str, where: str, fields) -> None:
        """Each of `fields` present and non-empty in the mapping `item`."""
        if not isinstance(item, dict):
            raise BadItem(f"{file}: {where}: expected an object with fields, got {type(item).__name__}")
        for field in fields:
            value = item.get(field)
            if value is None or (isinstance(value, (str, list)) and not value):
                self.fail(file, where, field, "missing or empty")

    def image(self, path: str, file: str, where: str, field: str) -> LazyImage:
        if self.verify_images:
            problem = check_image(path)
            if problem:
                self.fail(file, where, field, f"{problem}: {path}")
        return LazyImage.with_budget(path, self.budget)

    def encoded_image(self, data, name: str, file: str, where: str, field: str) -> EncodedImage:
        """An image stored in the file itself (`data`: the image file's bytes; `name`: what to call it)."""
        if not isinstance(data, bytes) or not data:
            self.fail(file, where, field, f"expected the image file's bytes, got {type(data).__name__}")
        if self.verify_images:
            problem = check_image(data)
            if problem:
                self.fail(file, where, field, f"{problem}: {name}")
        return EncodedImage.with_budget(data, name, self.budget)

    def add(self, rows: list, build) -> None:
        """Append `build()`'s row; a BadItem it raises is re-raised or counted, as the policy says."""
        try:
            rows.append(build())
        except BadItem as error:
            if self.on_bad_item == "error":
                raise
            self.skipped.append(str(error))

    def finish(self, rows: list, name: str) -> Rows:
        if self.skipped:
            logger.warning("%s: skipped %d bad item(s); first: %s", name, len(self.skipped), self.skipped[0])
        return Rows(rows, self.skipped)


def make_ids_unique(rows: list[dict]) -> None:
    """A repeated id keeps its first row's id; the others get `#<n>` added, so evaluation (which
    matches finished records by id) never mixes two items up."""
    seen: dict[str, int] = {}
    for row in rows:
        count = seen.get(row["id"], 0)
        seen[row["id"]] = count + 1
        if count:
            row["id"] = f"{row['id']}#{count}"


def same_text(a: str, b: str) -> bool:
    """Equal once whitespace is collapsed and case folded (an answer text against an option text)."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def resolve(root: str, path: str) -> str:
    return os.path.abspath(os.path.join(root, path))
