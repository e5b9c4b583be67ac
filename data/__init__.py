"""Data: turn datasets into rows and rows into chat messages. Knows nothing of the trainer or rewards."""

from data.images import ImageBudget, LazyImage, fit_to_budget, size_images_for
from data.items import Rows
from data.medvqa import BENCHMARKS, load_medxpertqa_mm, load_pathvqa, load_pmc_vqa, load_slake, load_vqa_rad
from data.omnimedvqa import load_omnimedvqa
from data.pathmmu import load_pathmmu
from data.prompts import (
    INSTRUCTION, MEDICAL_SYSTEM_PROMPT, SHORT_ANSWER_INSTRUCTION, SYSTEM_PROMPT, YES_NO_INSTRUCTION, build_messages,
    sft_target, to_prompt_rows,
)
from data.splits import load_split_manifest, paper_split, save_split_manifest, select_part
from data.toy import TOY_FAMILIES, make_toy_dataset

__all__ = [
    "BENCHMARKS",
    "INSTRUCTION",
    "MEDICAL_SYSTEM_PROMPT",
    "SHORT_ANSWER_INSTRUCTION",
    "YES_NO_INSTRUCTION",
    "SYSTEM_PROMPT",
    "TOY_FAMILIES",
    "ImageBudget",
    "LazyImage",
    "Rows",
    "build_messages",
    "fit_to_budget",
    "load_medxpertqa_mm",
    "load_omnimedvqa",
    "load_pathmmu",
    "load_pathvqa",
    "load_pmc_vqa",
    "load_slake",
    "load_vqa_rad",
    "load_split_manifest",
    "make_toy_dataset",
    "paper_split",
    "save_split_manifest",
    "select_part",
    "size_images_for",
    "sft_target",
    "to_prompt_rows",
]
