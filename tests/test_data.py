"""The toy pathology set and the prompt builders."""

import re
from collections import Counter

import numpy as np
import pytest

from data import (
    INSTRUCTION,
    SYSTEM_PROMPT,
    TOY_FAMILIES,
    build_messages,
    make_toy_dataset,
    sft_target,
    to_prompt_rows,
)


@pytest.fixture(scope="module")
def toy():
    return make_toy_dataset(400, seed=0)


def _pixels(row):
    return np.asarray(row["image"], dtype=np.float64)


def _nucleus_fraction(row):
    """Share of pixels much darker than the tile's median: hematoxylin nuclei, not stroma or fibres."""
    luminance = _pixels(row).mean(axis=2)
    return float((luminance < np.median(luminance) - 45).mean())


def _mean_over(rows, attribute, value, measure):
    return float(np.mean([measure(r) for r in rows if r["attributes"][attribute] == value]))


def test_same_seed_same_rows_and_pixels(toy):
    again = make_toy_dataset(400, seed=0)
    for a, b in zip(toy, again):
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
        assert np.array_equal(_pixels(a), _pixels(b))


def test_item_depends_only_on_seed_and_index(toy):
    prefix = make_toy_dataset(20, seed=0)
    assert [r["id"] for r in prefix] == [r["id"] for r in toy[:20]]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(prefix, toy))


def test_different_seed_different_items(toy):
    other = make_toy_dataset(20, seed=1)
    assert [r["id"] for r in other] != [r["id"] for r in toy[:20]]
    assert not any(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(other, toy))
    assert [r["attributes"] for r in other] != [r["attributes"] for r in toy[:20]]


def test_images_are_rgb_tiles_of_the_requested_size(toy):
    assert all(r["image"].mode == "RGB" and r["image"].size == (112, 112) for r in toy)
    assert make_toy_dataset(2, image_size=64)[0]["image"].size == (64, 64)


def test_row_schema_and_options(toy):
    assert len(TOY_FAMILIES) >= 3 and all(len(classes) == 4 for classes in TOY_FAMILIES.values())
    for i, row in enumerate(toy):
        assert row["id"] == f"toy-0-{i}" and row["source"] == "toy"
        assert row["options"] == [f"{l}) {t}" for l, t in zip("ABCD", TOY_FAMILIES[row["family"]])]
        assert row["options"].count(row["solution"]) == 1
        # The asked-about attribute is the solution's text; every tile carries all four attributes.
        assert row["solution"][3:].lower() == row["attributes"][row["family"]]
        assert set(TOY_FAMILIES) <= set(row["attributes"])
        assert row["question"].endswith("?")


def test_families_and_answer_letters_are_balanced(toy):
    letters = Counter(r["solution"][0] for r in toy)
    assert set(letters) == set("ABCD")
    assert all(0.20 <= letters[l] / len(toy) <= 0.30 for l in "ABCD")
    families = Counter(r["family"] for r in toy)
    assert set(families) == set(TOY_FAMILIES) and len(families) >= 3
    assert max(families.values()) - min(families.values()) <= 4


def test_explanation_reasons_without_giving_the_letter(toy):
    for row in toy:
        text = row["explanation"]
        assert 12 <= len(text.split()) <= 35
        assert not re.search(r"\b[A-D]\)", text)
        answer = row["attributes"][row["family"]]
        assert text.endswith(f"{answer}.")
        wrong = [c.lower() for c in TOY_FAMILIES[row["family"]] if c.lower() != answer]
        assert sum(w in text for w in wrong) >= 2
    density_rows = [r for r in toy if r["family"] == "density"]
    assert all(f"{r['attributes']['nuclei_count']} " in r["explanation"] for r in density_rows)


def test_density_and_size_drive_nuclear_area(toy):
    sparse = _mean_over(toy, "density", "sparse", _nucleus_fraction)
    dense = _mean_over(toy, "density", "dense", _nucleus_fraction)
    very_dense = _mean_over(toy, "density", "very dense", _nucleus_fraction)
    assert dense > 3 * sparse and very_dense > dense
    small = _mean_over(toy, "nuclear_size", "small", _nucleus_fraction)
    very_large = _mean_over(toy, "nuclear_size", "very large", _nucleus_fraction)
    assert very_large > 3 * small


def test_nuclei_count_follows_density_classes(toy):
    counts = {c.lower(): [r["attributes"]["nuclei_count"] for r in toy if r["attributes"]["density"] == c.lower()]
              for c in TOY_FAMILIES["density"]}
    ordered = [counts[c.lower()] for c in TOY_FAMILIES["density"]]
    assert all(max(lower) < min(higher) for lower, higher in zip(ordered, ordered[1:]))


def test_stain_drives_tile_colour(toy):
    def mean_colour(stain):
        return np.mean([_pixels(r).mean(axis=(0, 1)) for r in toy if r["attributes"]["stain"] == stain], axis=0)

    pale, pink, purple, blue = (mean_colour(c.lower()) for c in TOY_FAMILIES["stain"])
    assert pale.mean() > pink.mean() + 15  # pale tiles are brighter
    red_minus_blue = [c[0] - c[2] for c in (pink, purple, blue)]
    assert red_minus_blue[0] > red_minus_blue[1] + 20 > red_minus_blue[2] + 40  # pink -> purple -> blue-violet


def test_glands_show_pale_lumens():
    rows = make_toy_dataset(160, seed=3)

    def white_fraction(row):  # lumen pixels: bright in every channel, unlike even the palest eosin
        return float((np.asarray(row["image"]).min(axis=2) > 225).mean())

    assert _mean_over(rows, "architecture", "gland-like rings", white_fraction) > 0.02
    for other in TOY_FAMILIES["architecture"][1:]:
        assert _mean_over(rows, "architecture", other.lower(), white_fraction) < 0.002


def _row(**changes):
    row = {
        "image": object(),
        "question": "What is the density of nuclei?",
        "options": ["A) Sparse", "B) Dense"],
        "solution": "B) Dense",
        "explanation": "Many crowded nuclei, so not sparse.",
    }
    row.update(changes)
    return row


def test_build_messages_structure():
    system, user = build_messages(_row())
    assert system == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
    assert user["role"] == "user" and user["content"][0] == {"type": "image"}
    assert user["content"][1]["text"] == "What is the density of nuclei?\nA) Sparse\nB) Dense\n" + INSTRUCTION
    assert "<think>" in INSTRUCTION and "<answer>" in INSTRUCTION
    assert [m["role"] for m in build_messages(_row(), system_prompt=None)] == ["user"]
    assert [m["role"] for m in build_messages(_row(), system_prompt="")] == ["user"]


def test_sft_target():
    assert sft_target(_row()) == "<think>Many crowded nuclei, so not sparse.</think><answer>B) Dense</answer>"
    fallback = sft_target(_row(explanation=None))
    assert re.fullmatch(r"<think>\S.*</think><answer>B\) Dense</answer>", fallback)
    assert sft_target(_row(explanation="  ")) == fallback


def test_to_prompt_rows_adds_prompt_without_mutating(toy):
    rows = toy[:3]
    before = [dict(r) for r in rows]
    out = to_prompt_rows(rows, source="toy")
    assert rows == before and all("prompt" not in r for r in rows)
    assert [r["prompt"] for r in out] == [build_messages(r) for r in rows]
    assert all({k: v for k, v in o.items() if k != "prompt"} == r for o, r in zip(out, rows))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"options": None}, "pathmmu row 1: missing field 'options'"),
        ({"options": []}, "pathmmu row 1: missing field 'options'"),
        ({"image": None}, "pathmmu row 1: missing field 'image'"),
        ({"question": ""}, "pathmmu row 1: missing field 'question'"),
        ({"solution": None}, "pathmmu row 1: missing field 'solution'"),
        ({"options": "A) Sparse"}, "pathmmu row 1: field 'options' must be a list"),
        ({"solution": "C) Moderate"}, "pathmmu row 1: solution 'C) Moderate' is not one of the options"),
    ],
)
def test_to_prompt_rows_names_the_bad_row_and_field(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        to_prompt_rows([_row(), _row(**changes)], source="pathmmu")


def test_to_prompt_rows_tolerates_whitespace_around_solution():
    out = to_prompt_rows([_row(solution=" B) Dense\n")])
    assert out[0]["solution"] == " B) Dense\n"


def test_to_prompt_rows_reports_an_absent_key():
    row = _row()
    del row["options"]
    with pytest.raises(ValueError, match=re.escape("dataset row 0: missing field 'options'")):
        to_prompt_rows([row])


def test_family_subset_is_the_same_items_as_the_full_set():
    full = make_toy_dataset(32, seed=5, image_size=56)
    stain = make_toy_dataset(5, seed=5, image_size=56, families=("stain",))
    expected = [row for row in full if row["family"] == "stain"][:5]
    assert [row["id"] for row in stain] == [row["id"] for row in expected]
    for a, b in zip(stain, expected):
        assert a["solution"] == b["solution"] and a["image"].tobytes() == b["image"].tobytes()
    with pytest.raises(ValueError, match="families"):
        make_toy_dataset(2, families=("colour",))
