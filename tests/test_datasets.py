"""PathMMU / OmniMedVQA loaders, lazy sized images, the paper split and its manifests, YAML configs."""

import json
import os
import random

import pytest
from dataset_trees import OMNI_DATASETS, write_image, write_omnimedvqa, write_pathmmu
from PIL import Image

from data import (
    LazyImage, fit_to_budget, load_omnimedvqa, load_pathmmu, load_split_manifest, paper_split, save_split_manifest,
    select_part, to_prompt_rows,
)
from grpo import GRPOConfig, SFTConfig
from grpo.config import apply_overrides, load_yaml
from grpo.prompts import load_image


@pytest.fixture(scope="module")
def pathmmu(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("PathMMU"))
    return root, write_pathmmu(root)


@pytest.fixture(scope="module")
def rows(pathmmu):
    return load_pathmmu(pathmmu[0], on_bad_item="skip")


# ---------------------------------------------------------------- PathMMU


def test_pathmmu_rows_have_the_shared_fields(pathmmu, rows):
    root, data = pathmmu
    by_id = {row["id"]: row for row in rows}
    three, five = by_id["PubMed/val/2"], by_id["PubMed/val/3"]
    item = data["PubMed"]["val"][2]
    assert three == {
        "id": "PubMed/val/2", "image": os.path.join(os.path.abspath(root), "images", "p2.png"),
        "question": item["question"], "options": item["options"], "solution": item["answer"],
        "explanation": item["explanation"], "source": "PubMed", "split": "val",
    }
    assert isinstance(three["image"], LazyImage) and len(three["options"]) == 3 and three["solution"] == "C) Lymphoma"
    assert len(five["options"]) == 5 and five["solution"] == "A) Adenocarcinoma"
    assert {row["source"] for row in rows} == {"PubMed", "EduContent"}  # SocialPath not asked for
    # Rows go straight into prompts, 3 and 5 options alike.
    prompts = to_prompt_rows([three, five])
    assert "C) Lymphoma" in prompts[0]["prompt"][-1]["content"][1]["text"]


def test_pathmmu_keeps_an_item_repeated_across_splits_once(rows):
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 24
    assert "PubMed/test/0" in ids and "PubMed/test_tiny/100" not in ids
    assert "EduContent/val/0" in ids and "EduContent/test_tiny/50" not in ids
    assert "PubMed/test_tiny/101" in ids  # a test_tiny item that is not a repeat stays
    # Same image, different question: two items, both kept.
    assert {"PubMed/val/0", "PubMed/val/1"} <= set(ids)


def test_pathmmu_subset_and_split_selection(pathmmu):
    rows = load_pathmmu(pathmmu[0], subsets=("PubMed",), splits=("test",))
    assert [row["id"] for row in rows] == [f"PubMed/test/{no}" for no in range(6)]
    with pytest.raises(ValueError, match="no subset 'Pubmed'; the file has PubMed, EduContent, SocialPath"):
        load_pathmmu(pathmmu[0], subsets=("Pubmed",))


def _mutate(root, change):
    """Write a fresh tree, apply `change(data, root)` to PubMed/test item 1, return the data.json path."""
    data = write_pathmmu(root, bad_item=False)
    change(data["PubMed"]["test"][1], root)
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(data, f)
    return os.path.join(root, "data.json")


def _corrupt(item, root):
    with open(os.path.join(root, "images", item["img"]), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really an image")


BAD_ITEMS = {
    "missing question": (lambda item, root: item.pop("question"), "question", "missing or empty"),
    "missing image": (lambda item, root: os.remove(os.path.join(root, "images", item["img"])), "img", "image file not found"),
    "corrupt image": (_corrupt, "img", "cannot read image"),
    "answer not an option": (lambda item, root: item.update(answer="B) Lymphomas"), "answer", "is not one of the options"),
    "options not a list": (lambda item, root: item.update(options="A) x B) y"), "options", "expected a list"),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_pathmmu_bad_item_names_file_index_and_field_or_is_skipped(tmp_path, case):
    change, field, problem = BAD_ITEMS[case]
    path = _mutate(str(tmp_path), change)
    with pytest.raises(ValueError) as error:
        load_pathmmu(str(tmp_path))
    message = str(error.value)
    assert path in message and "data['PubMed']['test'] item 1" in message and f"field {field!r}" in message
    assert problem in message
    rows = load_pathmmu(str(tmp_path), on_bad_item="skip")
    assert len(rows) == 23 and "PubMed/test/1" not in {row["id"] for row in rows}
    assert len(rows.skipped) == 1 and "item 1" in rows.skipped[0]


def test_pathmmu_fixture_bad_item_counts_as_one_skip(pathmmu, rows):
    with pytest.raises(ValueError, match=r"data\['EduContent'\]\['test'\] item 4: field 'answer'"):
        load_pathmmu(pathmmu[0])
    assert len(rows.skipped) == 1
    with pytest.raises(ValueError, match="on_bad_item must be one of error, skip"):
        load_pathmmu(pathmmu[0], on_bad_item="ignore")


# ---------------------------------------------------------------- images


def test_fit_to_budget_keeps_aspect_within_the_pixel_budget():
    # Worked by hand: 300x200 rounds to 308x196 = 60,368 px > 15,680; shrink by sqrt(60,000 / 15,680) = 1.956
    # -> 153.4 x 102.2 -> floored to multiples of 28: 140 x 84.
    assert fit_to_budget(300, 200, 784, 28 * 28 * 20) == (140, 84)
    # 30x10 is below 6,272 px: grow by sqrt(6,272 / 300) = 4.572 -> 137.2 x 45.7 -> ceiled: 140 x 56.
    assert fit_to_budget(30, 10, 6272, 10**6) == (140, 56)
    assert fit_to_budget(280, 140, 784, 10**6) == (280, 140)  # already fits: unchanged
    with pytest.raises(ValueError):
        fit_to_budget(10, 10, 2000, 1000)


def test_lazy_image_opens_as_rgb_at_its_budget_through_the_trainer(tmp_path):
    path = str(tmp_path / "big.png")
    write_image(path, 3, size=(300, 200), mode="P")
    image = LazyImage(path, min_pixels=784, max_pixels=28 * 28 * 20)
    assert image == os.path.abspath(path)  # it is the path: JSON, judges and os.path take it as is
    opened = load_image(image, row_index=0)  # what grpo.prompts does per batch
    assert opened.mode == "RGB" and opened.size == (140, 84)
    expected = Image.open(path).convert("RGB").resize((140, 84), Image.BICUBIC)
    assert opened.tobytes() == expected.tobytes()
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(image)), copy.deepcopy(image)):
        assert clone == image and clone.max_pixels == image.max_pixels
    os.remove(path)
    with pytest.raises(ValueError, match="row 7: field 'image': cannot open image"):
        load_image(image, row_index=7)


# ---------------------------------------------------------------- OmniMedVQA


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("OmniMedVQA"))
    return root, write_omnimedvqa(root)


def test_omnimedvqa_letters_options_and_maps_the_answer_text(omni):
    root, files = omni
    rows = load_omnimedvqa(root)
    assert [row["source"] for row in rows] == [name for name in OMNI_DATASETS for _ in range(3)]
    ct = rows[1]
    assert ct["id"] == "Chest CT Scan/ct-1" and ct["modality"] == "other"
    assert ct["options"] == [f"{letter}) Chest CT Scan finding {j}" for j, letter in enumerate("ABCD")]
    assert ct["solution"] == "B) Chest CT Scan finding 1" and ct["explanation"] is None
    assert ct["image"] == os.path.join(os.path.abspath(root), "Images", "Chest CT Scan", "train", "img_1.jpg")
    isic = [row for row in rows if row["source"] == "ISIC2020"]
    assert [row["id"] for row in isic] == ["ISIC2020/0", "ISIC2020/1", "ISIC2020/2"]  # no question_id: the index
    assert [len(row["options"]) for row in isic] == [2, 2, 2] and isic[2]["solution"] == "A) ISIC2020 finding 0"
    oct_rows = [row for row in rows if row["source"] == "Retinal OCT-C8"]
    assert {row["modality"] for row in oct_rows} == {"OCT"}  # this file says `modality`
    dr = [row for row in rows if row["source"] == "Diabetic Retinopathy"]
    assert dr[2]["options"][-1] == "C) Diabetic Retinopathy finding 2" and dr[2]["solution"] == dr[2]["options"][2]


def test_omnimedvqa_answer_text_matches_despite_case_and_spaces(tmp_path):
    write_omnimedvqa(str(tmp_path))
    path = tmp_path / "QA_information" / "Open-access" / "ISIC2020.json"
    items = json.loads(path.read_text())
    items[0]["gt_answer"] = "  isic2020   FINDING 1 "
    items[1]["gt_answer"] = "melanoma"
    path.write_text(json.dumps(items))
    with pytest.raises(ValueError) as error:
        load_omnimedvqa(str(tmp_path), datasets=["ISIC2020"])
    assert str(path) in str(error.value) and "item 1: field 'gt_answer'" in str(error.value)
    rows = load_omnimedvqa(str(tmp_path), datasets=["ISIC2020"], on_bad_item="skip")
    assert [row["solution"] for row in rows] == ["B) ISIC2020 finding 1", "A) ISIC2020 finding 0"]
    assert len(rows.skipped) == 1
    with pytest.raises(FileNotFoundError, match="datasets there: .*ISIC2020"):
        load_omnimedvqa(str(tmp_path), datasets=["ISIC 2020"])


def test_omnimedvqa_repeated_question_ids_still_give_distinct_ids(tmp_path):
    write_omnimedvqa(str(tmp_path))
    path = tmp_path / "QA_information" / "Open-access" / "Chest CT Scan.json"
    items = json.loads(path.read_text())
    for item in items:
        item["question_id"] = "ct-same"
    path.write_text(json.dumps(items))
    rows = load_omnimedvqa(str(tmp_path), datasets=["Chest CT Scan"])
    assert [row["id"] for row in rows] == ["Chest CT Scan/ct-same", "Chest CT Scan/ct-same#1", "Chest CT Scan/ct-same#2"]


# ---------------------------------------------------------------- the paper split


def test_paper_split_sizes_disjoint_image_disjoint_deterministic(rows):
    sft, rl, test = paper_split(rows, sizes=(12, 5, 6), seed=0)
    assert (len(sft), len(rl), len(test)) == (12, 5, 6)
    ids = [set(row["id"] for row in part) for part in (sft, rl, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    images = [set(row["image"] for row in part) for part in (sft, rl, test)]
    assert not (images[0] & images[1] or images[0] & images[2] or images[1] & images[2])
    # The two questions about p0.png travel together.
    together = [k for k, part in enumerate(ids) if {"PubMed/val/0", "PubMed/val/1"} & part]
    assert len(together) <= 1 and (not together or {"PubMed/val/0", "PubMed/val/1"} <= ids[together[0]])
    shuffled = list(rows)
    random.Random(5).shuffle(shuffled)
    again = paper_split(shuffled, sizes=(12, 5, 6), seed=0)
    assert [[row["id"] for row in part] for part in again] == [[row["id"] for row in part] for part in (sft, rl, test)]
    other = paper_split(rows, sizes=(12, 5, 6), seed=1)
    assert [row["id"] for row in other[2]] != [row["id"] for row in test]
    # All 24 rows used: the shared-image pair cannot block an exact fill.
    assert sum(len(part) for part in paper_split(rows, sizes=(14, 4, 6), seed=3)) == 24


def test_paper_split_says_how_many_rows_it_needs(rows):
    with pytest.raises(ValueError, match=r"sizes 3000 \+ 1000 \+ 1385 need 5385 rows, but there are only 24"):
        paper_split(rows)
    pairs = [dict(row, image=f"shared{k % 2}.png") for k, row in enumerate(rows)]  # two images, 12 rows each
    with pytest.raises(ValueError, match="without putting one image in two parts"):
        paper_split(pairs, sizes=(12, 6, 6))


def test_manifest_round_trip_freezes_the_split(rows, tmp_path):
    parts = dict(zip(("sft", "rl", "test"), paper_split(rows, sizes=(12, 5, 6), seed=0)))
    path = str(tmp_path / "splits" / "manifest.json")
    save_split_manifest(path, parts, seed=0, sizes=[12, 5, 6])
    manifest = load_split_manifest(path)
    assert manifest["seed"] == 0 and manifest["parts"]["test"] == [row["id"] for row in parts["test"]]
    for name, part in parts.items():
        assert select_part(rows, path, name) == part
    with pytest.raises(ValueError, match=r"parts.test\[0\]: id .* is not among the 3 loaded rows"):
        select_part(parts["sft"][:3], path, "test")
    with pytest.raises(ValueError, match="no part 'train'; it has sft, rl, test"):
        select_part(rows, path, "train")
    manifest["parts"]["rl"].append(manifest["parts"]["test"][0])
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=r"parts.test\[0\]: id .* is also in part 'rl'"):
        load_split_manifest(path)


# ---------------------------------------------------------------- YAML configs


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("learning_rate: 1e-6\nadam_betas: [0.9, 0.95]\nprompts_per_step: 2\ncompletions_per_micro_batch: 8\n")
    config = GRPOConfig.from_yaml(str(path), beta=0.0)
    assert config.learning_rate == 1e-6 and isinstance(config.learning_rate, float)  # YAML reads 1e-6 as a string
    assert config.adam_betas == (0.9, 0.95) and config.beta == 0.0 and config.prompts_per_step == 2
    sft = tmp_path / "sft.yaml"
    sft.write_text("batch_size: 4\nmicro_batch_size: 2\n")
    assert SFTConfig.from_yaml(str(sft), max_steps=7) == SFTConfig(batch_size=4, micro_batch_size=2, max_steps=7)


def test_config_unknown_key_lists_close_matches(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("learning_rat: 1.0e-6\n")
    with pytest.raises(ValueError, match=r"grpo.yaml \(GRPOConfig\): unknown key 'learning_rat'; did you mean 'learning_rate'"):
        GRPOConfig.from_yaml(str(path))
    with pytest.raises(ValueError, match="unknown key 'max_step'; did you mean 'max_steps'"):
        SFTConfig.from_dict({"max_step": 3})
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        GRPOConfig.from_dict({"learning_rate": "fast"})


def test_yaml_extends_and_dotted_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: base\ngrpo: {beta: 0.04, max_steps: 10}\njudge: {model: gpt-4o}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ngrpo: {max_steps: 20}\n")
    values = load_yaml(str(tmp_path / "child.yaml"))
    assert values == {"model": "base", "grpo": {"beta": 0.04, "max_steps": 20}, "judge": {"model": "gpt-4o"}}
    changed = apply_overrides(values, ["grpo.beta=0", "judge=null", "model=/tmp/tiny", "data.part=rl", "grpo.lr=1.0e-6"])
    assert changed == {"model": "/tmp/tiny", "grpo": {"beta": 0, "max_steps": 20, "lr": 1e-6}, "judge": None,
                       "data": {"part": "rl"}}
    assert values["grpo"]["beta"] == 0.04  # the loaded values are left untouched
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(values, ["grpo.beta"])
