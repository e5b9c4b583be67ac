"""The medical VQA benchmarks, each read from its public release as it lies on disk.

| loader | on disk | answer types |
|---|---|---|
| `load_vqa_rad`, `load_pathvqa` | parquet shards `<split>-NNNNN-of-NNNNN[-hash].parquet` (under `data/` in the Hugging Face releases) with columns `image` ({bytes, path}), `question`, `answer` | closed (the answer is yes or no), else open |
| `load_slake` | `train.json` / `validation.json` / `test.json` (lists of items with `img_name`, `question`, `answer`, `q_lang`, `answer_type` OPEN / CLOSED, `qid`, ...) + `imgs/<folder>/source.jpg` | closed / open, from the file |
| `load_pmc_vqa` | `test_2.csv` / `train_2.csv` with `Figure_path`, `Question`, `Choice A`..`Choice D` (the text may carry its own "A:" label), `Answer` (the letter or the option text, as releases differ) + `images/` | choice |
| `load_medxpertqa_mm` | `MM/test.jsonl` / `MM/dev.jsonl` with `id`, `question`, `options` (letter -> text), `label` (letter), `images` (file names) + `images/` | choice, several images per item |

Every loader returns rows with the same fields, so the benchmarks mix in one training set or one
`datasets.Dataset`: id ("<benchmark>/<split>/<item>"), image (one image: a LazyImage, or an
EncodedImage holding the parquet's bytes) or images (a list, MedXpertQA; the other field is None),
question, options ("A) text" strings for multiple choice, else None), solution (the option for
multiple choice, "yes" / "no" for a yes/no question, else the reference answer), explanation (None),
answer_type ("closed", "open" or "choice"), benchmark, split.

Bad items: a ValueError naming the file, the item's place in it (row, line or index) and the field;
with on_bad_item="skip" the item is left out and counted in the returned list's `skipped`, as
`data.pathmmu.load_pathmmu` does. Images are sized to the image budget when opened (`data.images`:
max_visual_tokens of image_token_pixels a side, or min_pixels / max_pixels).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re

from data.images import PATCH, ImageBudget
from data.items import BadItem, ItemChecker, Rows, make_ids_unique, resolve, same_text
from data.prompts import YES_NO

BENCHMARKS = ("vqa_rad", "pathvqa", "slake", "pmc_vqa", "medxpertqa_mm")
_SLAKE_TYPES = {"CLOSED": "closed", "OPEN": "open"}
# A choice's own label at the start of its text, as PMC-VQA writes it: "A:Brain", " B: Liver", "(C) x".
_CHOICE_LABEL = re.compile(r"\s*\(?([A-D])\s*[:)]\s*", re.IGNORECASE)
_LETTER_ONLY = re.compile(r"\(?([A-D])\)?[:.)]?", re.IGNORECASE)


def _row(benchmark: str, split: str, item, question, solution: str, answer_type: str, image=None, images=None,
         options=None) -> dict:
    return {"id": f"{benchmark}/{split}/{item}", "image": image, "images": images, "question": str(question).strip(),
            "options": options, "solution": solution, "explanation": None, "answer_type": answer_type,
            "benchmark": benchmark, "split": split}


def _release_files(root: str, files, expected: str):
    """(path, split) of each named file under `root`, the split being the file name's stem; a missing
    file is an error that says what the release should hold (`expected`)."""
    for name in files:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (expected {expected})")
        yield path, os.path.splitext(os.path.basename(name))[0]


def _short_answer(answer) -> tuple[str, str]:
    """(solution, answer type) of a free answer: "yes" / "no" (lower case) is closed, anything else open."""
    text = " ".join(str(answer).split())
    folded = text.casefold().rstrip(".")
    return (folded, "closed") if folded in YES_NO else (text, "open")


# ---------------------------------------------------------------------- VQA-RAD, PathVQA (parquet)
def load_vqa_rad(root: str, splits=("test",), on_bad_item: str = "error", min_pixels: int | None = None,
                 max_pixels: int | None = None, verify_images: bool = True, max_visual_tokens: int | None = None,
                 image_token_pixels: int | None = PATCH) -> Rows:
    """VQA-RAD (train 1,793 / test 451 items) from its parquet shards under `root`; see `load_parquet_vqa`."""
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    return load_parquet_vqa(root, "vqa_rad", splits, on_bad_item, budget, verify_images)


def load_pathvqa(root: str, splits=("test",), on_bad_item: str = "error", min_pixels: int | None = None,
                 max_pixels: int | None = None, verify_images: bool = True, max_visual_tokens: int | None = None,
                 image_token_pixels: int | None = PATCH) -> Rows:
    """PathVQA (train 19.7k / validation 6.26k / test 6.72k items) from its parquet shards; see `load_parquet_vqa`."""
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    return load_parquet_vqa(root, "pathvqa", splits, on_bad_item, budget, verify_images)


def load_parquet_vqa(root: str, benchmark: str, splits, on_bad_item: str = "error", budget: ImageBudget = ImageBudget(),
                     verify_images: bool = True) -> Rows:
    """Rows of the shards `<split>-*.parquet` anywhere under `root` (sorted by name), for each split.

    A row's image is the parquet's own bytes (an EncodedImage, decoded only when a batch needs it;
    the split's image files stay in memory, ~25 KB an image for PathVQA). Item ids count the split's
    rows over its shards in name order. An answer "yes" or "no" (any case, a final period allowed)
    makes a closed row with solution "yes" / "no"; any other answer an open row.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"{benchmark}: reading parquet shards needs pyarrow: pip install -e '.[medvqa]'") from error
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows = []
    for split in splits:
        shards = sorted(glob.glob(os.path.join(root, "**", f"{split}-*.parquet"), recursive=True))
        if not shards:
            have = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
            raise FileNotFoundError(f"{benchmark}: no {split}-*.parquet shard under {root}"
                                    + (f"; parquet files there: {', '.join(have)}" if have else ""))
        count = 0
        for shard in shards:
            file = pq.ParquetFile(shard)
            missing = [c for c in ("image", "question", "answer") if c not in file.schema_arrow.names]
            if missing:
                raise ValueError(f"{shard}: no column {', '.join(map(repr, missing))}; it has {', '.join(file.schema_arrow.names)}")
            index = 0
            for batch in file.iter_batches(batch_size=256, columns=["image", "question", "answer"]):
                for item in batch.to_pylist():
                    checker.add(rows, lambda: _parquet_row(item, shard, f"row {index}", benchmark, split, count, checker))
                    index += 1
                    count += 1
    return checker.finish(rows, f"{benchmark} {root}")


def _parquet_row(item, shard, where, benchmark, split, count, checker: ItemChecker) -> dict:
    checker.require(item, shard, where, ("image", "question", "answer"))
    image = item["image"]
    if not isinstance(image, dict) or not image.get("bytes"):
        checker.fail(shard, where, "image", "expected {bytes, path} with the image file's bytes")
    solution, kind = _short_answer(item["answer"])
    name = f"{os.path.basename(shard)} {where}" + (f" ({image['path']})" if image.get("path") else "")
    return _row(benchmark, split, count, item["question"], solution, kind,
                image=checker.encoded_image(image["bytes"], name, shard, where, "image"))


# ---------------------------------------------------------------------- SLAKE
def load_slake(root: str, splits=("test",), language: str | None = "en", on_bad_item: str = "error",
               min_pixels: int | None = None, max_pixels: int | None = None,
               verify_images: bool = True, max_visual_tokens: int | None = None,
               image_token_pixels: int | None = PATCH) -> Rows:
    """SLAKE: `<root>/<split>.json` (splits train, validation, test) and `<root>/imgs/<img_name>`.

    Only items whose `q_lang` is `language` are read ("en" by convention; "zh" for the Chinese half,
    None for both); the others are not rows and not counted as skipped. The answer type is the file's
    (CLOSED -> "closed", OPEN -> "open"); a closed answer of yes / no is written in lower case, other
    closed answers ("Liver", "T2") and open answers as in the file. Ids use `qid` (unique per split).
    """
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows = []
    expected = "SLAKE's <root>/{train,validation,test}.json and <root>/imgs/"
    for path, split in _release_files(root, [f"{split}.json" for split in splits], expected):
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list of items, got {type(items).__name__}")
        first = len(rows)
        for index, item in enumerate(items):
            if language is not None and isinstance(item, dict) and item.get("q_lang") != language:
                continue
            checker.add(rows, lambda: _slake_row(item, root, path, f"item {index}", split, index, checker))
        make_ids_unique(rows[first:])
    return checker.finish(rows, f"SLAKE {root}")


def _slake_row(item, root, path, where, split, index, checker: ItemChecker) -> dict:
    checker.require(item, path, where, ("img_name", "question", "answer", "answer_type"))
    kind = _SLAKE_TYPES.get(str(item["answer_type"]).strip().upper())
    if kind is None:
        checker.fail(path, where, "answer_type", f"expected OPEN or CLOSED, got {item['answer_type']!r}")
    answer = " ".join(str(item["answer"]).split())
    if not answer:
        checker.fail(path, where, "answer", "missing or empty")
    yes_no, _ = _short_answer(answer)
    solution = yes_no if yes_no in YES_NO else answer
    image = checker.image(resolve(root, os.path.join("imgs", item["img_name"])), path, where, "img_name")
    qid = item.get("qid")
    return _row("slake", split, qid if qid is not None else index, item["question"], solution, kind, image=image)


# ---------------------------------------------------------------------- PMC-VQA
def load_pmc_vqa(root: str, files=("test_2.csv",), image_dir: str = "images", on_bad_item: str = "error",
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 verify_images: bool = True, max_visual_tokens: int | None = None,
                 image_token_pixels: int | None = PATCH) -> Rows:
    """PMC-VQA: CSV files under `root` (`test_2.csv`, `train_2.csv`) and `<root>/<image_dir>/<Figure_path>`.

    Options are "A) text" from `Choice A`..`Choice D`, each choice's own "A:" label removed (choices
    are consecutive; an empty one ends them, at least two are needed). `Answer` may hold the letter
    ("B", "B:", "(B)") or the option's text (with or without its label; compared with collapsed
    whitespace and folded case): both name the solution option. The split is the file name's stem;
    ids count the file's data rows from 0.
    """
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows = []
    expected = f"PMC-VQA's CSV files with Figure_path, Question, Choice A..D, Answer, images under {image_dir}/"
    for path, split in _release_files(root, files, expected):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("Figure_path", "Question", "Choice A", "Choice B", "Answer") if c not in header]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; the header has {', '.join(header)}")
            for index, item in enumerate(reader):
                # Data row `index` is line index + 2 of the file (after the header) unless a quoted field spans lines.
                checker.add(rows, lambda: _pmc_row(item, root, image_dir, path, f"row {index}", split, index, checker))
    return checker.finish(rows, f"PMC-VQA {root}")


def _pmc_row(item, root, image_dir, path, where, split, index, checker: ItemChecker) -> dict:
    checker.require(item, path, where, ("Figure_path", "Question", "Answer"))
    options = []
    for letter in "ABCD":
        text = (item.get(f"Choice {letter}") or "").strip()
        label = _CHOICE_LABEL.match(text)
        if label and label.group(1).upper() == letter:
            text = text[label.end():].strip()
        if not text:
            break
        options.append(f"{letter}) {text}")
    if len(options) < 2:
        checker.fail(path, where, "Choice A..D", f"expected at least two choices, got {len(options)}")
    solution = _pmc_solution(item["Answer"].strip(), options)
    if solution is None:
        checker.fail(path, where, "Answer", f"{item['Answer']!r} is neither an option letter nor one option's text {options}")
    image = checker.image(resolve(root, os.path.join(image_dir, item["Figure_path"].strip())), path, where, "Figure_path")
    return _row("pmc_vqa", split, index, item["Question"], solution, "choice", image=image, options=options)


def _pmc_solution(answer: str, options: list[str]) -> str | None:
    letter = _LETTER_ONLY.fullmatch(answer)
    if letter:
        return next((o for o in options if o[0] == letter.group(1).upper()), None)
    label = _CHOICE_LABEL.match(answer)
    if label:  # "B:Liver": the label must agree with the text
        named = next((o for o in options if o[0] == label.group(1).upper()), None)
        return named if named and same_text(named[3:], answer[label.end():]) else None
    matches = [o for o in options if same_text(o[3:], answer)]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------------- MedXpertQA-MM
def load_medxpertqa_mm(root: str, files=("MM/test.jsonl",), image_dir: str = "images", on_bad_item: str = "error",
                       min_pixels: int | None = None, max_pixels: int | None = None,
                       verify_images: bool = True, max_visual_tokens: int | None = None,
                       image_token_pixels: int | None = PATCH) -> Rows:
    """MedXpertQA, multimodal subset: JSON-lines files under `root` (`MM/test.jsonl`, `MM/dev.jsonl`),
    images at `<root>/<image_dir>/<file name>`.

    Rows carry `images` (every file of the item's `images` list, in order; one image part each in the
    prompt) and options "A) text" in letter order from the `options` mapping; the solution is the
    option `label` names. The release repeats the options in the question after "Answer Choices:";
    that tail is cut, so the prompt lists them once. The split is the file name's stem; ids are the
    items' `id`.
    """
    budget = ImageBudget(image_token_pixels, max_visual_tokens, min_pixels, max_pixels)
    checker = ItemChecker(on_bad_item, budget, verify_images)
    rows = []
    expected = f"MedXpertQA-MM's JSON lines with id, question, options, label, images, the images under {image_dir}/"
    for path, split in _release_files(root, files, expected):
        first = len(rows)
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    checker.add(rows, lambda: _medxpert_row(line, root, image_dir, path, f"line {number}", split, checker))
        make_ids_unique(rows[first:])
    return checker.finish(rows, f"MedXpertQA-MM {root}")


def _medxpert_row(line, root, image_dir, path, where, split, checker: ItemChecker) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadItem(f"{path}: {where}: not valid JSON ({error})") from None
    checker.require(item, path, where, ("id", "question", "options", "label", "images"))
    options = item["options"]
    if not isinstance(options, dict) or len(options) < 2 or not all(str(t).strip() for t in options.values()):
        checker.fail(path, where, "options", f"expected a mapping of at least two letters to option texts, got {options!r}")
    options = {str(letter).strip().upper(): " ".join(str(text).split()) for letter, text in sorted(options.items())}
    label = str(item["label"]).strip().upper()
    if label not in options:
        checker.fail(path, where, "label", f"{item['label']!r} is not one of the option letters {', '.join(options)}")
    names = item["images"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        checker.fail(path, where, "images", f"expected a list of image file names, got {names!r}")
    images = [checker.image(resolve(root, os.path.join(image_dir, n.strip())), path, where, "images") for n in names]
    question = str(item["question"]).split("Answer Choices:")[0]
    if not question.strip():
        checker.fail(path, where, "question", "nothing before 'Answer Choices:'")
    return _row("medxpertqa_mm", split, item["id"], question, f"{label}) {options[label]}", "choice", images=images,
                options=[f"{letter}) {text}" for letter, text in options.items()])
