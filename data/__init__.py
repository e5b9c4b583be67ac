"""Data: turn datasets into rows and rows into chat messages. Knows nothing of the trainer or rewards."""

from data.prompts import INSTRUCTION, SYSTEM_PROMPT, build_messages, sft_target, to_prompt_rows
from data.toy import TOY_FAMILIES, make_toy_dataset

__all__ = [
    "INSTRUCTION",
    "SYSTEM_PROMPT",
    "TOY_FAMILIES",
    "build_messages",
    "make_toy_dataset",
    "sft_target",
    "to_prompt_rows",
]
