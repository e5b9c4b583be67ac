"""Small PathMMU and OmniMedVQA trees written in exactly the on-disk formats of SPEC 4, for the tests."""

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
