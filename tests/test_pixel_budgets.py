"""Image budgets belong to the model: images are sized to multiples of the family's pixels per visual token
(28 for Qwen2/2.5-VL, 32 for Qwen3-VL and Qwen3.5, read from the processor), within a budget of visual
tokens, so the processor does not resize them again; Gemma 3 and InternVL get them unresized (their
processors size images their own way). The paper's default on Qwen2.5-VL is what it always was."""

import json
import os
import pickle

import pytest
import yaml
from PIL import Image

from data import ImageBudget, fit_to_budget, make_toy_dataset, size_images_for
from data.images import EncodedImage, LazyImage
from data.jsonl import load_jsonl
from grpo.cli import _processor, load_rows, load_run
from grpo.models import Family, family_class
from grpo.models.gemma3 import Gemma3Family
from grpo.models.internvl import InternVLFamily
from grpo.tiny import build_tiny_model_and_processor
from real_checkpoints import missing_reason, real_processors_root

SIZE = (1000, 700)  # larger than 512 visual tokens on every family: the budget shrinks it


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A one-row JSONL file whose image is a 1000 x 700 gradient (resampling changes its pixels)."""
    root = tmp_path_factory.mktemp("budgets")
    image = Image.linear_gradient("L").resize(SIZE).convert("RGB")
    image.save(root / "big.png")
    (root / "rows.jsonl").write_text(json.dumps({"id": "a", "image": "big.png", "question": "Which?",
                                                 "options": ["A) x", "B) y"], "solution": "A) x"}) + "\n")
    return str(root / "rows.jsonl")


def grid_pixels(processor, image) -> tuple[int, int]:
    """(width, height) in pixels of the patch grid the processor cut `image` into."""
    _, rows, cols = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    patch = processor.image_processor.patch_size
    return cols * patch, rows * patch


@pytest.mark.parametrize("family, token_pixels", [("qwen2_5_vl", 28), ("qwen2_vl", 28), ("qwen3_vl", 32), ("qwen3_5", 32)])
def test_qwen_images_fit_the_families_visual_tokens_and_the_processor_keeps_them(jsonl, family, token_pixels):
    # The processor's own budget is larger than ours: what it does to our image is its grid, nothing else.
    model, processor = build_tiny_model_and_processor(family=family, max_pixels=1024 * token_pixels**2)
    assert family_class(model.config).image_token_pixels(processor) == token_pixels
    (row,) = load_jsonl(jsonl, image_token_pixels=token_pixels)
    image = row["image"].open_image()
    width, height = image.size
    assert width % token_pixels == 0 and height % token_pixels == 0
    tokens = width * height // token_pixels**2
    assert 400 <= tokens <= 512  # the paper's 512 visual tokens, at the family's token size
    assert grid_pixels(processor, image) == image.size  # no second resize
    if token_pixels == 32:  # sized for Qwen2.5-VL's 28 px, the image is resampled again
        stale = Image.new("RGB", fit_to_budget(*SIZE, factor=28))
        assert grid_pixels(processor, stale) != stale.size


def test_the_paper_default_on_qwen2_5_vl_is_unchanged(jsonl):
    (row,) = load_jsonl(jsonl)  # no image_token_pixels: Qwen2.5-VL's 28
    expected = fit_to_budget(*SIZE, min_pixels=4 * 28 * 28, max_pixels=512 * 28 * 28, factor=28)
    assert row["image"].open_image().size == expected == (756, 504)  # 27 x 18 = 486 visual tokens
    assert (row["image"].min_pixels, row["image"].max_pixels) == (3136, 401408)
    # The demo's rows hold PIL images drawn at their size: nothing resizes them, for any family.
    toy = make_toy_dataset(2, seed=0, image_size=56)
    assert [r["image"] for r in size_images_for(toy, 32)] == [r["image"] for r in toy]


@pytest.mark.parametrize("family, cls", [("gemma3", Gemma3Family), ("internvl", InternVLFamily)])
def test_fixed_size_and_tiling_processors_get_images_unresized(jsonl, family, cls):
    model, processor = build_tiny_model_and_processor(family=family)
    assert family_class(model.config) is cls
    assert cls.image_token_pixels(processor) is None and Family.image_token_pixels(processor) is None
    (row,) = load_jsonl(jsonl, image_token_pixels=None)
    opened = row["image"].open_image()
    with Image.open(row["image"]) as original:
        assert opened.size == SIZE and opened.tobytes() == original.convert("RGB").tobytes()
    assert "not resized" in repr(row["image"])


def test_the_budget_in_visual_tokens_means_the_same_on_every_family(jsonl):
    for token_pixels in (28, 32):
        (row,) = load_jsonl(jsonl, max_visual_tokens=64, image_token_pixels=token_pixels)
        width, height = row["image"].open_image().size
        assert width * height <= 64 * token_pixels**2 and width % token_pixels == height % token_pixels == 0
    (row,) = load_jsonl(jsonl, max_pixels=200_000, image_token_pixels=32)  # pixels, as before
    assert row["image"].max_pixels == 200_000
    with pytest.raises(ValueError, match="give max_visual_tokens .* or max_pixels .*, not both"):
        load_jsonl(jsonl, max_visual_tokens=64, max_pixels=200_000)
    with pytest.raises(ValueError, match="need 1024 .* <= max_pixels"):
        ImageBudget(factor=32, max_pixels=1000)


def test_rows_loaded_once_are_resized_for_another_model(jsonl):
    (row,) = load_jsonl(jsonl, max_visual_tokens=64)
    with open(os.path.join(os.path.dirname(jsonl), "big.png"), "rb") as f:
        encoded = EncodedImage(f.read(), "big.png", max_visual_tokens=64)
    (qwen3,) = size_images_for([{**row, "images": [encoded]}], 32)
    for image in (qwen3["image"], qwen3["images"][0]):
        assert image.budget == ImageBudget(factor=32, max_visual_tokens=64)
        assert image.open_image().size == fit_to_budget(*SIZE, 4 * 32 * 32, 64 * 32 * 32, 32)
        clone = pickle.loads(pickle.dumps(image))
        assert clone == image and clone.budget == image.budget and type(clone) is type(image)
    assert isinstance(qwen3["image"], LazyImage) and row["image"].budget.factor == 28  # the input rows are unchanged
    (gemma,) = size_images_for([row], None)
    assert gemma["image"].open_image().size == SIZE


@pytest.mark.parametrize("family, token_pixels", [("qwen3_vl", 32), ("gemma3", None)])
def test_the_command_line_sizes_images_for_the_models_family(jsonl, tmp_path, family, token_pixels):
    model, processor = build_tiny_model_and_processor(family=family)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tmp_path / "model"), "data": {"train": jsonl}}))
    run = load_run(str(config))
    _, pixels = _processor(run, "train")
    assert pixels == token_pixels
    (row,) = load_rows(run, "train", pixels)
    assert row["image"].budget.factor == token_pixels


@pytest.mark.parametrize("name, token_pixels", [("qwen2_5_vl", 28), ("qwen3_5", 32), ("gemma3", None)])
def test_real_processors(jsonl, name, token_pixels):
    if missing_reason(name):
        pytest.skip(missing_reason(name))
    path = real_processors_root() / name
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    assert family_class(AutoConfig.from_pretrained(path)).image_token_pixels(processor) == token_pixels
    (row,) = load_jsonl(jsonl, image_token_pixels=token_pixels)
    image = row["image"].open_image()
    if token_pixels is None:
        assert image.size == SIZE
        assert processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].shape[-2:] == (896, 896)
    else:
        assert image.width * image.height <= 512 * token_pixels**2
        assert grid_pixels(processor, image) == image.size
