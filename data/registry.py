"""Loaders and system prompts by name, for config files (`python -m grpo`, docs/command-line.md).

A loader returns rows (id, image or images, question, options, solution, ...); its keyword arguments are
the settings a config gives it. A new loader or prompt is one line here.
"""

from data.jsonl import load_jsonl
from data.medvqa import load_medxpertqa_mm, load_pathvqa, load_pmc_vqa, load_slake, load_vqa_rad
from data.omnimedvqa import load_omnimedvqa
from data.pathmmu import load_pathmmu
from data.prompts import MEDICAL_SYSTEM_PROMPT, SYSTEM_PROMPT
from data.toy import make_toy_dataset

LOADERS = {
    "jsonl": load_jsonl,  # your own data: path, on_bad_item, the image budget (max_visual_tokens, ...)
    "pathmmu": load_pathmmu,  # root, subsets, splits, ...
    "omnimedvqa": load_omnimedvqa,  # root, datasets, ...
    "toy": make_toy_dataset,  # the synthetic pathology set: n, seed, image_size, families
    "vqa_rad": load_vqa_rad,  # the medical VQA benchmarks (docs/data.md, "Medical VQA benchmarks"): root, splits, ...
    "pathvqa": load_pathvqa,
    "slake": load_slake,
    "pmc_vqa": load_pmc_vqa,
    "medxpertqa_mm": load_medxpertqa_mm,
}

SYSTEM_PROMPTS = {
    "pathology": SYSTEM_PROMPT,  # the paper's
    "medical": MEDICAL_SYSTEM_PROMPT,  # for radiology, pathology and figures from papers (the medical VQA benchmarks)
}
