"""Small benchmark trees written in exactly the on-disk formats of their public releases, for the tests:
PathMMU and OmniMedVQA (data/pathmmu.py, data/omnimedvqa.py), and the medical VQA benchmarks
(data/medvqa.py)."""

from __future__ import annotations

import json
import os

from PIL import Image

OMNI_DATASETS = ("Chest CT Scan", "ISIC2020", "Retinal OCT-C8", "Diabetic Retinopathy")


def write_image(path: str, seed: int, size=(40, 30), mode: str = "RGB") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    Image.new("RGB", size, colour).convert(mode).save(path)


def _item(no: int, img: str, question: str, n_options: int = 4, answer: int = 1, **extra) -> dict:
    texts = ["Adenocarcinoma", "Squamous cell carcinoma", "Lymphoma", "Normal tissue", "Melanoma"]
    options = [f"{'ABCDE'[k]}) {texts[k]}" for k in range(n_options)]
    return {"No": no, "img": img, "question": question, "options": options, "answer": options[answer],
            "explanation": f"The tile in {img} shows features of {texts[answer].lower()}.", **extra}


def write_pathmmu(root: str, bad_item: bool = True) -> dict:
    """data.json + images/: subsets PubMed, EduContent (the paper's) and SocialPath (not loaded by default).

    Unique usable items of PubMed + EduContent: 24. Planted on purpose:
      PubMed/val/1 shares its image with PubMed/val/0 (another question about the same figure);
      PubMed/val/2 has 3 options, PubMed/val/3 has 5;
      PubMed/test_tiny/100 repeats PubMed/test/0 and EduContent/test_tiny/50 repeats EduContent/val/0;
      EduContent/test item 4 (when `bad_item`) answers with a text that is not among its options.
    """
    data = {"PubMed": {"val": [], "test": [], "test_tiny": []}, "EduContent": {"val": [], "test": [], "test_tiny": []},
            "SocialPath": {"val": [], "test": [], "test_tiny": []}}
    pub, edu = data["PubMed"], data["EduContent"]
    for no in range(8):
        image = "p0.png" if no == 1 else f"p{no}.png"
        pub["val"].append(_item(no, image, f"PubMed val question {no}: what is shown?",
                                n_options={2: 3, 3: 5}.get(no, 4), answer=no % 3))
    for no in range(6):
        pub["test"].append(_item(no, f"p{8 + no}.png", f"PubMed test question {no}: which diagnosis?", answer=(no + 1) % 4))
    pub["test_tiny"] = [dict(pub["test"][0], No=100), _item(101, "p14.png", "PubMed tiny question: which diagnosis?")]
    for no in range(5):
        edu["val"].append(_item(no, f"e{no}.png", f"EduContent val question {no}: name the lesion.", answer=no % 4))
    for no in range(4):
        edu["test"].append(_item(no, f"e{5 + no}.png", f"EduContent test question {no}: name the lesion.", answer=2))
    if bad_item:
        edu["test"].append(dict(_item(4, "e9.png", "EduContent test question 4: name the lesion."), answer="E) Sarcoma"))
    edu["test_tiny"] = [dict(edu["val"][0], No=50)]
    data["SocialPath"]["test"] = [_item(0, "s0.png", "SocialPath question", tw_id=123, img_position=0, ref_web="x")]
    images = {item["img"] for subset in data.values() for split in subset.values() for item in split}
    for k, name in enumerate(sorted(images)):
        write_image(os.path.join(root, "images", name), k, mode="P" if k % 2 else "RGB")
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(data, f)
    return data


def write_omnimedvqa(root: str) -> dict:
    """QA_information/Open-access/<name>.json for the four paper sets; Retinal OCT-C8 says `modality`."""
    files = {}
    for d, name in enumerate(OMNI_DATASETS):
        items = []
        n_options = {"ISIC2020": 2, "Diabetic Retinopathy": 3}.get(name, 4)
        for k in range(3):
            texts = [f"{name} finding {j}" for j in range(n_options)]
            image_path = f"Images/{name}/train/img_{k}.jpg"
            write_image(os.path.join(root, image_path), 10 * d + k)
            item = {"question": f"What does this {name} image show? ({k})", "gt_answer": texts[k % n_options],
                    "image_path": image_path, "question_type": "Disease Diagnosis", "dataset": name}
            item.update({f"option_{'ABCD'[j]}": text for j, text in enumerate(texts)})
            item["modality" if name == "Retinal OCT-C8" else "modality_type"] = "OCT" if name == "Retinal OCT-C8" else "other"
            if name == "Chest CT Scan":
                item["question_id"] = f"ct-{k}"
            items.append(item)
        files[name] = items
        path = os.path.join(root, "QA_information", "Open-access", f"{name}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(items, f)
    return files


# ---------------------------------------------------------------- the medical VQA benchmarks (data/medvqa.py)
def _png(seed: int, size=(40, 30)) -> bytes:
    import io

    buffer = io.BytesIO()
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path: str, items: list[dict]) -> None:
    """A shard as the Hugging Face releases write it: `datasets` with an Image feature ({bytes, path})."""
    import datasets

    datasets.disable_progress_bars()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_list(items, features=features).to_parquet(path)


# (question, answer) pairs: yes/no answers in the case the releases use, and open answers.
VQA_RAD_TEST = [("Is there evidence of a pneumothorax?", "no"), ("Is the heart enlarged?", "Yes"),
                ("Which side is the lesion on?", "right"), ("What imaging modality is this?", "x-ray")]
PATHVQA_TEST = [("Does this image show carcinoma?", "yes"), ("What does this image show?", "the lung"),
                ("Is the tissue necrotic?", "no"), ("How is the nucleus shaped?", "round"),
                ("Are the cells dividing?", "yes")]


def write_parquet_vqa(root: str, benchmark: str) -> dict[str, list[tuple[str, str]]]:
    """`data/<split>-NNNNN-of-NNNNN-<hash>.parquet` as in flaviagiammarino/vqa-rad and /path-vqa.

    VQA-RAD: train (2 items) and test in one shard each. PathVQA: test in two shards (3 + 2 items,
    read in name order), validation in one. Returns each split's (question, answer) pairs in order.
    """
    if benchmark == "vqa_rad":
        splits = {"train": [[("Is this a CT scan?", "no"), ("Where is the mass?", "left lung")]], "test": [VQA_RAD_TEST]}
    else:
        splits = {"test": [PATHVQA_TEST[:3], PATHVQA_TEST[3:]], "validation": [[("Is this normal tissue?", "no")]]}
    seed = 0
    for split, shards in splits.items():
        for k, pairs in enumerate(shards):
            items = []
            for question, answer in pairs:
                seed += 1
                items.append({"image": {"bytes": _png(seed), "path": f"{split}_{seed}.jpg"}, "question": question,
                              "answer": answer})
            _write_parquet(os.path.join(root, "data", f"{split}-{k:05d}-of-{len(shards):05d}-{seed:04x}e1a.parquet"), items)
    return {split: [pair for shard in shards for pair in shard] for split, shards in splits.items()}


def _slake_item(qid: int, img: int, question: str, answer: str, answer_type: str, lang: str = "en") -> dict:
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer, "q_lang": lang,
            "location": "Lung", "modality": "CT", "answer_type": answer_type, "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


def write_slake(root: str) -> dict:
    """train.json / validation.json / test.json + imgs/xmlab<N>/source.jpg. test.json: 4 English items
    (CLOSED yes, CLOSED with a non-yes/no answer, OPEN, OPEN) and 2 Chinese ones."""
    files = {
        "train": [_slake_item(0, 1, "Is this a CT image?", "Yes", "CLOSED"), _slake_item(1, 1, "这是CT图像吗？", "是", "CLOSED", "zh")],
        "validation": [_slake_item(10, 2, "What organ is shown?", "Lung", "OPEN")],
        "test": [
            _slake_item(20, 3, "Does the picture contain lung?", "Yes", "CLOSED"),
            _slake_item(21, 3, "这张图片包含肺吗？", "是", "CLOSED", "zh"),
            _slake_item(22, 4, "Which is bigger in this image, liver or spleen?", "Liver", "CLOSED"),
            _slake_item(23, 4, "What modality is used to take this image?", "CT", "OPEN"),
            _slake_item(24, 5, "Where is the abnormality?", "Left Lung, Right", "OPEN"),
            _slake_item(25, 5, "异常在哪里？", "左肺", "OPEN", "zh"),
        ],
    }
    for split, items in files.items():
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump(items, f, ensure_ascii=False, indent=1)
        for item in items:
            path = os.path.join(root, "imgs", item["img_name"])
            if not os.path.exists(path):
                write_image(path, item["img_id"])
    return files


PMC_COLUMNS = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def write_pmc_vqa(root: str) -> list[dict]:
    """test_2.csv (choices with their own " A:" labels, the answer as the option text in one row and as
    the letter in another, as the releases differ) + images/."""
    rows = [
        {"Figure_path": "PMC1_F1.jpg", "Question": "What imaging technique was used?", "Answer": "CT scan",
         "Choice A": " A:MRI ", "Choice B": " B:CT scan ", "Choice C": " C:Ultrasound ", "Choice D": " D:X-ray ", "Answer_label": "B"},
        {"Figure_path": "PMC2_F3.jpg", "Question": "Which structure is marked by the arrow?", "Answer": "C",
         "Choice A": " A:Aorta ", "Choice B": " B:Liver ", "Choice C": " C:Left kidney ", "Choice D": " D:Spleen ", "Answer_label": "C"},
        {"Figure_path": "PMC3_F2.jpg", "Question": "What stain is shown?", "Answer": " A:Hematoxylin and eosin",
         "Choice A": " A:Hematoxylin and eosin ", "Choice B": " B:Masson trichrome ", "Choice C": " C:PAS ",
         "Choice D": " D:Giemsa ", "Answer_label": "A"},
        {"Figure_path": "PMC4_F1.jpg", "Question": "What is the most likely diagnosis?", "Answer": "d",
         "Choice A": " A:Glioma ", "Choice B": " B:Meningioma ", "Choice C": " C:Abscess ", "Choice D": " D:Metastasis ", "Answer_label": "D"},
    ]
    import csv

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "test_2.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PMC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for k, row in enumerate(rows):
        write_image(os.path.join(root, "images", row["Figure_path"]), 40 + k)
    return rows


def write_medxpertqa_mm(root: str) -> list[dict]:
    """MM/test.jsonl + images/: three items with 1, 2 and 3 images; the question repeats the options
    after "Answer Choices:" as the release does."""
    items = []
    for k, n_images in enumerate((1, 2, 3)):
        options = {letter: f"Finding {letter.lower()}{k}" for letter in "ABCDE"}
        choices = " ".join(f"({letter}) {text}" for letter, text in options.items())
        items.append({"id": f"MM-{k}", "question": f"A {40 + k}-year-old patient presents with pain. What is the "
                      f"diagnosis?\nAnswer Choices: {choices}", "options": options, "label": "ABCDE"[k + 1],
                      "images": [f"MM-{k}-{'abc'[j]}.jpeg" for j in range(n_images)], "medical_task": "Diagnosis",
                      "body_system": "Respiratory", "question_type": "Reasoning"})
    os.makedirs(os.path.join(root, "MM"), exist_ok=True)
    with open(os.path.join(root, "MM", "test.jsonl"), "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    for k, item in enumerate(items):
        for j, name in enumerate(item["images"]):
            write_image(os.path.join(root, "images", name), 60 + 3 * k + j)
    return items


# The folders examples/medvqa/configs/*.yaml expect under data/.
MEDVQA_FOLDERS = {"vqa_rad": "vqa-rad", "pathvqa": "path-vqa", "slake": "Slake1.0", "pmc_vqa": "PMC-VQA",
                  "medxpertqa_mm": "MedXpertQA"}


def write_medvqa(data_dir: str) -> dict[str, str]:
    """All five benchmarks under `data_dir`, in the folders the shipped configs name; returns each one's root."""
    roots = {name: os.path.join(data_dir, folder) for name, folder in MEDVQA_FOLDERS.items()}
    write_parquet_vqa(roots["vqa_rad"], "vqa_rad")
    write_parquet_vqa(roots["pathvqa"], "pathvqa")
    write_slake(roots["slake"])
    write_pmc_vqa(roots["pmc_vqa"])
    write_medxpertqa_mm(roots["medxpertqa_mm"])
    return roots
