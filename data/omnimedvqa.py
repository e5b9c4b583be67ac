"""OmniMedVQA (open-access part): `<root>/QA_information/Open-access/<Dataset Name>.json`, images under root.

An item: {"question": str, "option_A": str, "option_B": str, optional "option_C", "option_D",
"gt_answer": the correct option's TEXT, "image_path": "Images/...", "modality_type" (one file names
it "modality"), "question_type", sometimes "question_id" and "dataset"}.
"""

from __future__ import annotations

import json
import os

from data.images import PATCH, ImageBudget
from data.items import ItemChecker, Rows, make_ids_unique, resolve, same_text

# The paper's out-of-domain sets: CT, dermoscopy, OCT and fundus photography.
PAPER_DATASETS = ("Chest CT Scan", "ISIC2020", "Retinal OCT-C8", "Diabetic Retinopathy")
_LETTERS = "ABCD"
_REQUIRED = ("question", "option_A", "option_B", "gt_answer", "image_path")


def load_omnimedvqa(root: str, datasets=PAPER_DATASETS, on_bad_item: str = "error",
                    min_pixels: int | None = None, max_pixels: int | None = None,
                    verify_images: bool = True, max_visual_tokens: int | None = None,
                    image_token_pixels: int | None = PATCH) -> Rows:
    """Rows of the named datasets, in file order.

    Row fields: id ("<dataset>/<question_id or item index>"), image (LazyImage of root/image_path),
    question, options (["A) text", "B) text", ...] for the options present), solution (the lettered
    option whose text is gt_answer), explanation (None), source (the dataset name), modality
    (`modality_type` or `modality`), question_type. Bad items: as in `data.pathmmu.load_pathmmu`.
    """
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows = []
    for name in datasets:
        path = os.path.join(root, "QA_information", "Open-access", f"{name}.json")
        if not os.path.isfile(path):
            folder = os.path.dirname(path)
            have = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
            raise FileNotFoundError(f"OmniMedVQA: {path} not found" + (f"; datasets there: {', '.join(have)}" if have else ""))
        with open(path) as f:
            items = json.load(f)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list of items, got {type(items).__name__}")
        first = len(rows)
        for index, item in enumerate(items):
            checker.add(rows, lambda: _row(item, root, path, f"item {index}", name, index, checker))
        make_ids_unique(rows[first:])  # a question_id repeated within one file
    return checker.finish(rows, f"OmniMedVQA {root}")


def _row(item, root, path, where, name, index, checker: ItemChecker) -> dict:
    checker.require(item, path, where, _REQUIRED)
    options = []
    for letter in _LETTERS:
        text = item.get(f"option_{letter}")
        if text is None or not str(text).strip():
            break  # options are consecutive: A, B, then optionally C and D
        options.append(f"{letter}) {str(text).strip()}")
    answer = str(item["gt_answer"]).strip()
    matches = [option for option in options if same_text(option[3:], answer)]
    if len(matches) != 1:
        problem = "is not one of the options" if not matches else "matches several options"
        checker.fail(path, where, "gt_answer", f"{answer!r} {problem} {options}")
    question_id = item.get("question_id")
    return {
        "id": f"{name}/{question_id if question_id is not None else index}",
        "image": checker.image(resolve(root, item["image_path"]), path, where, "image_path"),
        "question": str(item["question"]).strip(),
        "options": options,
        "solution": matches[0],
        "explanation": None,
        "source": name,
        "modality": item.get("modality_type", item.get("modality")),
        "question_type": item.get("question_type"),
    }
