"""Data: turn datasets into rows and rows into chat messages. Knows nothing of the trainer or rewards."""

from data.images import LazyImage, fit_to_budget
from data.items import Rows
from data.omnimedvqa import load_omnimedvqa
from data.pathmmu import load_pathmmu
from data.prompts import INSTRUCTION, SYSTEM_PROMPT, build_messages, sft_target, to_prompt_rows
from data.splits import load_split_manifest, paper_split, save_split_manifest, select_part
from data.toy import TOY_FAMILIES, make_toy_dataset

__all__ = [
    "INSTRUCTION",
    "SYSTEM_PROMPT",
    "TOY_FAMILIES",
    "LazyImage",
    "Rows",
    "build_messages",
    "fit_to_budget",
    "load_omnimedvqa",
    "load_pathmmu",
    "load_split_manifest",
    "make_toy_dataset",
    "paper_split",
    "save_split_manifest",
    "select_part",
    "sft_target",
    "to_prompt_rows",
]
