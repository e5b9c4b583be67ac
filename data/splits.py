"""The paper's 3,000 / 1,000 / 1,385 split (SFT / RL / test) and manifests that freeze a split in a file.

A manifest is JSON: {"parts": {"sft": [ids], "rl": [ids], "test": [ids]}, ...any extra info}. Share
it with the results and every stage (and every other lab) trains and tests on the same items.
"""

from __future__ import annotations

import json
import os
import random

PAPER_SIZES = (3000, 1000, 1385)
PART_NAMES = ("sft", "rl", "test")


def paper_split(rows: list[dict], sizes=PAPER_SIZES, seed: int = 0) -> tuple[list[dict], ...]:
    """Disjoint parts of exactly `sizes` rows (default: SFT 3,000, RL 1,000, test 1,385).

    Image-disjoint: rows that share an image (several questions about one figure) always land in the
    same part, so no test image was seen in training. The same rows and seed give the same parts,
    whatever the input order. Rows left over when the sizes sum to less than len(rows) are unused.
    Raises ValueError when there are fewer rows than the sizes add up to, or when the image groups
    cannot fill the parts exactly.
    """
    sizes = [int(s) for s in sizes]
    need = sum(sizes)
    if any(s < 0 for s in sizes):
        raise ValueError(f"paper_split: sizes must be >= 0, got {sizes}")
    if len(rows) < need:
        raise ValueError(f"paper_split: sizes {' + '.join(map(str, sizes))} need {need} rows, but there are only {len(rows)}")
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"paper_split: row ids must be unique; {duplicate!r} appears more than once")

    groups: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):  # sorted: the result must not depend on input order
        groups.setdefault(str(row["image"]), []).append(row)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    # Largest groups first (random order among equal sizes): the single-image rows placed last can
    # then fill every part to its exact size.
    order.sort(key=lambda image: -len(groups[image]))

    parts: list[list[dict]] = [[] for _ in sizes]
    for image in order:
        group = groups[image]
        room = [size - len(part) for size, part in zip(sizes, parts)]
        fits = [k for k in range(len(sizes)) if room[k] >= len(group)]
        if fits:
            # The part with the most room left, relative to its size, so all parts fill at the same pace.
            k = max(fits, key=lambda k: room[k] / sizes[k])
            parts[k].extend(group)
    short = [(name, size, len(part)) for name, size, part in zip(PART_NAMES, sizes, parts) if len(part) < size]
    if short:
        detail = ", ".join(f"{name} {got}/{size}" for name, size, got in short)
        raise ValueError(f"paper_split: {len(rows)} rows in {len(groups)} image groups cannot fill parts of sizes {sizes} "
                         f"without putting one image in two parts ({detail}); use smaller sizes or another seed")
    return tuple(parts)


def save_split_manifest(path: str, parts: dict[str, list[dict]], **info) -> None:
    """Write the ids of each part (`{"sft": rows, ...}`) and any `info` (seed, sizes, source) as JSON."""
    manifest = {**info, "parts": {name: [row["id"] for row in part] for name, part in parts.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)


def load_split_manifest(path: str) -> dict:
    """The manifest as written; its parts are checked to be lists of ids, no id in two parts."""
    with open(path) as f:
        manifest = json.load(f)
    parts = manifest.get("parts") if isinstance(manifest, dict) else None
    if not isinstance(parts, dict):
        raise ValueError(f"{path}: field 'parts': expected an object of part name -> list of ids")
    owner: dict[str, str] = {}
    for name, ids in parts.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: field 'parts.{name}': expected a list of id strings")
        for index, row_id in enumerate(ids):
            if row_id in owner:
                raise ValueError(f"{path}: parts.{name}[{index}]: id {row_id!r} is also in part {owner[row_id]!r}")
            owner[row_id] = name
    return manifest


def select_part(rows: list[dict], manifest_path: str, part: str) -> list[dict]:
    """The rows of one manifest part, in the manifest's order; an id not among `rows` is a ValueError."""
    parts = load_split_manifest(manifest_path)["parts"]
    if part not in parts:
        raise ValueError(f"{manifest_path}: no part {part!r}; it has {', '.join(parts)}")
    by_id = {row["id"]: row for row in rows}
    selected = []
    for index, row_id in enumerate(parts[part]):
        if row_id not in by_id:
            raise ValueError(f"{manifest_path}: parts.{part}[{index}]: id {row_id!r} is not among the {len(rows)} loaded rows "
                             f"(a different dataset root, subsets or skipped bad items?)")
        selected.append(by_id[row_id])
    return selected
