"""Medical VQA beyond multiple choice: the loaders of VQA-RAD, PathVQA, SLAKE, PMC-VQA and MedXpertQA-MM
on files in their release formats (the table of data/medvqa.py), answer_reward, and vqa_metrics
against hand-computed numbers, including the two bugs of circulating evaluators (LLaVA-Med's closed
accuracy, MedEvalKit's F1 order)."""

import csv
import json
import os
import pickle

import pytest
from dataset_trees import (
    PATHVQA_TEST, VQA_RAD_TEST, write_image, write_medxpertqa_mm, write_parquet_vqa, write_pmc_vqa, write_slake,
)
from PIL import Image

from data import (
    MEDICAL_SYSTEM_PROMPT, SHORT_ANSWER_INSTRUCTION, YES_NO_INSTRUCTION, build_messages, load_medxpertqa_mm,
    load_pathvqa, load_pmc_vqa, load_slake, load_vqa_rad, sft_target, to_prompt_rows,
)
from data.images import EncodedImage, fit_to_budget
from grpo.prompts import load_image
from rewards import AnswerReward, answer_reward, format_reward, normalise_answer, token_overlap, vqa_metrics

FIELDS = {"id", "image", "images", "question", "options", "solution", "explanation", "answer_type", "benchmark", "split"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("medvqa")
    written = {}
    for name, write in [("vqa_rad", lambda r: write_parquet_vqa(r, "vqa_rad")), ("pathvqa", lambda r: write_parquet_vqa(r, "pathvqa")),
                        ("slake", write_slake), ("pmc_vqa", write_pmc_vqa), ("medxpertqa_mm", write_medxpertqa_mm)]:
        written[name] = (str(root / name), write(str(root / name)))
    return written


# ---------------------------------------------------------------- VQA-RAD, PathVQA


def test_vqa_rad_reads_the_parquet_shards_and_types_yes_no_answers_closed(trees):
    root, splits = trees["vqa_rad"]
    rows = load_vqa_rad(root)
    assert all(set(row) == FIELDS for row in rows)
    assert [q for q, _ in VQA_RAD_TEST] == [row["question"] for row in rows]
    # "no", "Yes" -> closed, written in lower case; "right", "x-ray" -> open, as in the file.
    assert [(row["solution"], row["answer_type"]) for row in rows] == [
        ("no", "closed"), ("yes", "closed"), ("right", "open"), ("x-ray", "open")]
    assert [row["id"] for row in rows] == [f"vqa_rad/test/{k}" for k in range(4)]
    assert {row["benchmark"] for row in rows} == {"vqa_rad"} and rows[0]["options"] is None and rows[0]["images"] is None
    assert len(load_vqa_rad(root, splits=("train", "test"))) == 6
    # The image is the parquet's own bytes, decoded only on demand, at the pixel budget; pickling keeps it.
    image = rows[0]["image"]
    assert isinstance(image, EncodedImage) and "test_" in repr(image) and "bytes" in repr(image) and len(repr(image)) < 200
    assert load_image(image, 0).size == fit_to_budget(40, 30) == (84, 56)  # the default budget's minimum
    assert pickle.loads(pickle.dumps(image)).open_image().size == image.open_image().size


def test_pathvqa_reads_every_shard_of_a_split_in_name_order(trees):
    root, _ = trees["pathvqa"]
    rows = load_pathvqa(root)
    assert [(row["question"], row["solution"]) for row in rows] == [(q, a) for q, a in PATHVQA_TEST]
    assert [row["answer_type"] for row in rows] == ["closed", "open", "closed", "open", "closed"]
    assert [row["id"] for row in rows] == [f"pathvqa/test/{k}" for k in range(5)]
    assert [row["split"] for row in load_pathvqa(root, splits=("validation",))] == ["validation"]
    with pytest.raises(FileNotFoundError, match=r"no train-\*.parquet shard .*test-00000-of-00002"):
        load_pathvqa(root, splits=("train",))


def test_parquet_bad_item_names_shard_row_and_field_or_is_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = str(tmp_path), write_parquet_vqa(str(tmp_path), "vqa_rad")
    shard = next(os.path.join(root, "data", f) for f in os.listdir(os.path.join(root, "data")) if f.startswith("test-"))
    table = pq.read_table(shard)
    answers = table.column("answer").to_pylist()
    answers[2] = ""
    images = table.column("image").to_pylist()
    images[3] = {"bytes": b"not an image", "path": "x.jpg"}
    pq.write_table(table.set_column(2, "answer", pa.array(answers)).set_column(0, "image", pa.array(images)), shard)
    with pytest.raises(ValueError) as error:
        load_vqa_rad(root)
    assert f"{shard}: row 2: field 'answer': missing or empty" in str(error.value)
    rows = load_vqa_rad(root, on_bad_item="skip")
    assert [row["id"] for row in rows] == ["vqa_rad/test/0", "vqa_rad/test/1"]
    assert len(rows.skipped) == 2 and "row 3: field 'image': cannot read image" in rows.skipped[1]


# ---------------------------------------------------------------- SLAKE


def test_slake_english_only_by_default_answer_type_from_the_file(trees):
    root, files = trees["slake"]
    rows = load_slake(root)
    assert [row["id"] for row in rows] == ["slake/test/20", "slake/test/22", "slake/test/23", "slake/test/24"]
    assert [(row["solution"], row["answer_type"]) for row in rows] == [
        ("yes", "closed"), ("Liver", "closed"), ("CT", "open"), ("Left Lung, Right", "open")]
    assert rows.skipped == []  # the Chinese rows are not items of the English benchmark, not bad items
    assert rows[0]["image"] == os.path.join(root, "imgs", "xmlab3", "source.jpg")
    chinese = load_slake(root, language="zh")
    assert [row["question"] for row in chinese] == ["这张图片包含肺吗？", "异常在哪里？"]
    assert len(load_slake(root, language=None)) == 6
    assert len(load_slake(root, splits=("train", "validation", "test"))) == 6
    with pytest.raises(FileNotFoundError, match=r"dev.json not found \(expected SLAKE's <root>/\{train,validation,test\}.json"):
        load_slake(root, splits=("dev",))


def test_slake_bad_item_names_file_index_and_field(tmp_path):
    files = write_slake(str(tmp_path))
    files["test"][3]["answer_type"] = "FREE"
    os.remove(os.path.join(str(tmp_path), "imgs", "xmlab5", "source.jpg"))
    with open(os.path.join(str(tmp_path), "test.json"), "w") as f:
        json.dump(files["test"], f, ensure_ascii=False)
    path = os.path.join(str(tmp_path), "test.json")
    with pytest.raises(ValueError, match=f"{path}: item 3: field 'answer_type': expected OPEN or CLOSED, got 'FREE'"):
        load_slake(str(tmp_path))
    rows = load_slake(str(tmp_path), on_bad_item="skip")
    assert [row["id"] for row in rows] == ["slake/test/20", "slake/test/22"]
    assert len(rows.skipped) == 2 and "item 4: field 'img_name': image file not found" in rows.skipped[1]


# ---------------------------------------------------------------- PMC-VQA


def test_pmc_vqa_accepts_the_answer_as_letter_or_as_option_text(trees):
    root, _ = trees["pmc_vqa"]
    rows = load_pmc_vqa(root)
    assert rows[0]["options"] == ["A) MRI", "B) CT scan", "C) Ultrasound", "D) X-ray"]  # the choices' own "A:" removed
    # Answer given as: the option text, the letter, the labelled text, a lower-case letter.
    assert [row["solution"] for row in rows] == ["B) CT scan", "C) Left kidney", "A) Hematoxylin and eosin", "D) Metastasis"]
    assert {row["answer_type"] for row in rows} == {"choice"} and rows[1]["id"] == "pmc_vqa/test_2/1"
    assert rows[0]["image"] == os.path.join(root, "images", "PMC1_F1.jpg")
    assert to_prompt_rows(rows)  # every solution is one of its options


@pytest.mark.parametrize("answer, problem", [
    ("E", "neither an option letter nor one option's text"),
    ("Kidney", "neither an option letter nor one option's text"),
    ("A:Left kidney", "neither an option letter nor one option's text"),  # the label and the text disagree
])
def test_pmc_vqa_bad_answer_names_file_row_and_field(tmp_path, answer, problem):
    rows = write_pmc_vqa(str(tmp_path))
    rows[1]["Answer"] = answer
    path = os.path.join(str(tmp_path), "test_2.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=f"{path}: row 1: field 'Answer': .*{problem}"):
        load_pmc_vqa(str(tmp_path))
    skipped = load_pmc_vqa(str(tmp_path), on_bad_item="skip")
    assert len(skipped) == 3 and len(skipped.skipped) == 1


# ---------------------------------------------------------------- MedXpertQA-MM


def test_medxpertqa_mm_rows_carry_every_image_of_an_item(trees):
    root, items = trees["medxpertqa_mm"]
    rows = load_medxpertqa_mm(root)
    assert [len(row["images"]) for row in rows] == [1, 2, 3] and all(row["image"] is None for row in rows)
    assert rows[2]["images"] == [os.path.join(root, "images", f"MM-2-{c}.jpeg") for c in "abc"]
    assert rows[1]["options"] == [f"{letter}) Finding {letter.lower()}1" for letter in "ABCDE"]
    assert rows[1]["solution"] == "C) Finding c1" and rows[1]["id"] == "medxpertqa_mm/test/MM-1"
    # The options are listed once: the question's own "Answer Choices:" tail is cut.
    assert rows[0]["question"] == "A 40-year-old patient presents with pain. What is the diagnosis?"
    user = to_prompt_rows(rows)[2]["prompt"][-1]["content"]
    assert [part["type"] for part in user] == ["image", "image", "image", "text"]
    assert user[-1]["text"].count("A) Finding a2") == 1


def test_medxpertqa_mm_bad_item_names_file_line_and_field(tmp_path):
    items = write_medxpertqa_mm(str(tmp_path))
    items[1]["label"] = "F"
    path = os.path.join(str(tmp_path), "MM", "test.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
        f.write("{not json\n")
    with pytest.raises(ValueError, match=f"{path}: line 2: field 'label': 'F' is not one of the option letters A, B, C, D, E"):
        load_medxpertqa_mm(str(tmp_path))
    rows = load_medxpertqa_mm(str(tmp_path), on_bad_item="skip")
    assert [row["id"] for row in rows] == ["medxpertqa_mm/test/MM-0", "medxpertqa_mm/test/MM-2"]
    assert len(rows.skipped) == 2 and "line 4: not valid JSON" in rows.skipped[1]


# ---------------------------------------------------------------- prompts


def test_prompts_ask_for_yes_no_or_a_short_answer_and_list_no_options(trees):
    rows = load_slake(trees["slake"][0])
    messages = [build_messages(row, MEDICAL_SYSTEM_PROMPT) for row in rows]
    texts = [m[-1]["content"][-1]["text"] for m in messages]
    assert texts[0] == "Does the picture contain lung?\n" + YES_NO_INSTRUCTION
    assert texts[1] == "Which is bigger in this image, liver or spleen?\n" + SHORT_ANSWER_INSTRUCTION  # closed, not yes/no
    assert texts[2].endswith(SHORT_ANSWER_INSTRUCTION)
    assert all("<think>" in t and "<answer>" in t for t in (YES_NO_INSTRUCTION, SHORT_ANSWER_INSTRUCTION))
    assert messages[0][0]["content"][0]["text"] == MEDICAL_SYSTEM_PROMPT
    assert sft_target(rows[0]).endswith("<answer>yes</answer>")
    with pytest.raises(ValueError, match="row 0: field 'answer_type' must be one of choice, closed, open, got 'free'"):
        to_prompt_rows([dict(rows[0], answer_type="free")])
    with pytest.raises(ValueError, match="row 0: missing field 'solution'"):
        to_prompt_rows([dict(rows[2], solution="")])


def test_image_columns_as_bytes_path_mappings_are_images(tmp_path):
    path = str(tmp_path / "x.png")
    write_image(path, 3)
    with open(path, "rb") as f:
        data = f.read()
    expected = Image.open(path).convert("RGB")
    assert load_image({"bytes": data, "path": None}, 0).tobytes() == expected.tobytes()
    assert load_image({"bytes": None, "path": path}, 0).tobytes() == expected.tobytes()
    with pytest.raises(ValueError, match="row 7: field 'image': cannot read image"):
        load_image({"bytes": b"junk", "path": "y.png"}, 7)


# ---------------------------------------------------------------- answer_reward


def wrap(answer: str) -> str:
    return f"<think>I look.</think><answer>{answer}</answer>"


@pytest.mark.parametrize("completion, solution, kind, expected", [
    (wrap("Yes"), "yes", "closed", 1.0),
    (wrap("yes."), "yes", "closed", 1.0),
    (wrap("no"), "yes", "closed", 0.0),
    (wrap("yes, there is"), "yes", "closed", 0.0),  # not exactly one of yes / no
    (wrap("yes or no"), "no", "closed", 0.0),
    ("yes", "yes", "closed", 0.0),  # no answer block
    (wrap("liver"), "Liver", "closed", 1.0),  # SLAKE's closed questions with a named answer
    (wrap("The Left Lung."), "left lung", "open", 1.0),  # case, article, punctuation
    (wrap("left  lung"), "Left lung", "open", 1.0),
    (wrap("lung"), "left lung", "open", 0.0),
    (wrap("B) CT scan"), "B) CT scan", "choice", 1.0),
    (wrap("CT scan"), "B) CT scan", "choice", 0.0),  # the paper's option matching: letter and text
    (wrap("B) CT scan"), "B) CT scan", None, 1.0),  # no answer_type: multiple choice (PathMMU rows)
    (wrap("anything"), None, "open", None),
])
def test_answer_reward_per_answer_type(completion, solution, kind, expected):
    assert answer_reward(None, [completion], solution=[solution], answer_type=[kind]) == [expected]


def test_answer_reward_partial_credit_for_open_answers_only():
    partial = AnswerReward(open_partial_credit=True)
    assert partial.__name__ == "answer_reward_partial" and answer_reward.__name__ == "answer_reward"
    # "lung" against "left lung": precision 1, recall 1/2 -> F1 2/3.
    got = partial(None, [wrap("lung"), wrap("no"), wrap("yes, it is")], solution=["left lung", "yes", "yes"],
                  answer_type=["open", "closed", "closed"])
    assert got == [pytest.approx(2 / 3), 0.0, 0.0]  # closed answers get no partial credit
    assert answer_reward(None, [wrap("B) x")], solution=["B) x"]) == [1.0]  # rows without an answer_type column
    with pytest.raises(ValueError, match="answer_type must be one of closed, open, choice, got 'free'"):
        answer_reward(None, [wrap("x")], solution=["x"], answer_type=["free"])


def test_normalisation_and_token_overlap_are_named():
    assert normalise_answer("  The T2-weighted, MRI! ") == "t2weighted mri"
    assert normalise_answer("an apple a day") == "apple day"
    overlap = token_overlap("left lower lobe of lung", "the left lung")  # 2 shared; 5 answer words, 2 reference words
    assert (overlap.precision, overlap.recall) == (pytest.approx(2 / 5), 1.0)
    assert overlap.f1 == pytest.approx(2 * 0.4 * 1.0 / 1.4)
    assert token_overlap(None, "lung") == token_overlap("", "lung") == token_overlap("heart", "lung")
    assert token_overlap("lung lung", "lung").precision == 0.5  # repeats counted once each


# ---------------------------------------------------------------- vqa_metrics


def test_closed_accuracy_counts_every_item_unlike_llava_med():
    """LLaVA-Med's evaluator appends nothing for a wrong closed prediction that contains "yes" or "no",
    so it would score these four items 2/3 (or 2/2); every item counts here: 2/4."""
    rows = [{"solution": s, "answer_type": "closed", "benchmark": "vqa_rad"} for s in ("yes", "no", "yes", "no")]
    predictions = [wrap("yes"), wrap("no"), wrap("no"), "I think yes but I am not sure"]  # right, right, wrong, malformed
    metrics = vqa_metrics(predictions, rows)
    assert metrics["vqa_rad"]["closed_items"] == 4 and metrics["vqa_rad"]["closed_accuracy"] == 0.5
    assert metrics["vqa_rad"]["open_items"] == 0 and metrics["vqa_rad"]["open_f1"] is None


def test_open_metrics_are_named_unlike_medevalkit():
    """MedEvalKit's helper returns (f1, precision, recall) and its caller unpacks (precision, recall, f1).
    Hand-computed: item 1 "left lower lobe" vs "left lobe": P 2/3, R 1, F1 4/5; item 2 "lung" vs "left
    lung": P 1, R 1/2, F1 2/3; item 3 "The heart." vs "heart": exact, P = R = F1 = 1; item 4 no answer: 0."""
    rows = [{"solution": s, "answer_type": "open", "benchmark": "slake"} for s in ("left lobe", "left lung", "heart", "liver")]
    predictions = [wrap("left lower lobe"), wrap("lung"), wrap("The heart."), "liver"]
    m = vqa_metrics(predictions, rows)["slake"]
    assert m["open_items"] == 4 and m["open_exact_match"] == 0.25
    assert m["open_precision"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert m["open_recall"] == pytest.approx((1 + 1 / 2 + 1 + 0) / 4)
    assert m["open_f1"] == pytest.approx((4 / 5 + 2 / 3 + 1 + 0) / 4)
    assert m["open_precision"] != pytest.approx(m["open_f1"]) and m["open_recall"] != pytest.approx(m["open_precision"])


def test_metrics_per_benchmark_and_answer_type():
    rows = [{"solution": "yes", "answer_type": "closed", "benchmark": "pathvqa"},
            {"solution": "round", "answer_type": "open", "benchmark": "pathvqa"},
            {"solution": "B) CT scan", "answer_type": "choice", "benchmark": "pmc_vqa"},
            {"solution": "C) Liver", "answer_type": "choice", "benchmark": "pmc_vqa"}]
    predictions = [wrap("yes"), wrap("oval"), wrap("B) CT scan"), wrap("B) Spleen")]
    metrics = vqa_metrics(predictions, rows)
    assert set(metrics) == {"all", "pathvqa", "pmc_vqa"}
    assert metrics["pathvqa"] == {"items": 2, "closed_items": 1, "closed_accuracy": 1.0, "open_items": 1,
                                  "open_exact_match": 0.0, "open_precision": 0.0, "open_recall": 0.0, "open_f1": 0.0,
                                  "choice_items": 0, "choice_accuracy": None}
    assert metrics["pmc_vqa"]["choice_accuracy"] == 0.5 and metrics["pmc_vqa"]["closed_accuracy"] is None
    assert metrics["all"]["items"] == 4 and metrics["all"]["choice_items"] == 2 and metrics["all"]["closed_accuracy"] == 1.0
    with pytest.raises(ValueError, match="3 predictions for 4 rows"):
        vqa_metrics(predictions[:3], rows)
    assert format_reward(None, predictions) == [1.0] * 4


# ---------------------------------------------------------------- Hugging Face datasets as input


@pytest.fixture
def image_opens(monkeypatch):
    """How many times an image file is opened (decoded), by any path: PIL.Image.open counts them all."""
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def hf_dataset(n: int, decode: bool = True):
    """A `datasets.Dataset` of `n` closed rows with an Image column, as `Dataset.from_list(rows)` of
    loader rows would give (the prompt column stored as chat messages)."""
    import io

    import datasets

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 120, 180)).save(buffer, format="PNG")
    row = {"image": {"bytes": buffer.getvalue(), "path": None}, "question": "Is there a lesion?", "solution": "yes",
           "answer_type": "closed"}
    prompt = build_messages(row, MEDICAL_SYSTEM_PROMPT)
    columns = {"id": [f"hf/{k}" for k in range(n)], "image": [row["image"]] * n, "prompt": [prompt] * n,
               "solution": ["yes" if k % 2 else "no" for k in range(n)], "answer_type": ["closed"] * n,
               "completion": [sft_target(row)] * n}
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(decode=decode),
        "prompt": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "solution": datasets.Value("string"), "answer_type": datasets.Value("string"), "completion": datasets.Value("string")})
    return datasets.Dataset.from_dict(columns, features=features)


def test_a_1000_row_dataset_starts_grpo_opening_only_the_first_steps_images(tiny_parts, tmp_path, image_opens):
    import copy

    from grpo import GRPOConfig, Trainer

    dataset = hf_dataset(1000)
    model, processor = tiny_parts
    config = GRPOConfig(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, completions_per_micro_batch=4,
                        max_completion_length=4, max_steps=1, save_steps=0, beta=0.0, seed=0)
    trainer = Trainer(copy.deepcopy(model), processor, [answer_reward, format_reward], dataset, config)
    assert image_opens == []  # validating 1,000 prompts read the prompt column only
    history = trainer.train()
    assert len(image_opens) == 2  # the step's 2 prompts, each image decoded once
    assert history[0]["step"] == 1 and history[0]["rewards/answer_reward/mean"] is not None


def test_sft_and_evaluate_take_a_dataset_with_undecoded_image_columns(tiny_parts, tmp_path, image_opens):
    import copy

    from grpo import SFTConfig, SFTTrainer, evaluate

    dataset = hf_dataset(1000, decode=False)  # rows hold {bytes, path}: grpo.prompts.load_image decodes them
    model, processor = tiny_parts
    trainer = SFTTrainer(copy.deepcopy(model), processor, dataset, SFTConfig(
        output_dir=str(tmp_path / "sft"), batch_size=2, micro_batch_size=2, max_steps=1, save_steps=0))
    assert image_opens == []
    trainer.train()
    assert len(image_opens) == 2
    # Evaluation reads the ids from the id column; resuming with 998 finished, only 2 images are opened.
    out = tmp_path / "eval.jsonl"
    out.write_text("".join(json.dumps({"id": f"hf/{k}", "completion": "", "tokens": 1, "truncated": False,
                                       "answer_reward": 0.0, "format_reward": 0.0}) + "\n" for k in range(998)))
    image_opens.clear()
    result = evaluate(model, processor, dataset, [answer_reward, format_reward], max_completion_length=4,
                      output_path=str(out), resume=True)
    assert len(image_opens) == 2 and len(result["records"]) == 1000
    assert [r["id"] for r in result["records"][-2:]] == ["hf/998", "hf/999"]
