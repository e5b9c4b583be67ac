"""The `<think>...</think><answer>...</answer>` output format: its reward and how to read it."""

from __future__ import annotations

import re

_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(prompts, completions: list[str], **columns) -> list[float]:
    """1.0 for a completion that is exactly a think block then an answer block (outer whitespace allowed), else 0.0."""
    return [1.0 if _FORMAT.fullmatch(completion.strip()) else 0.0 for completion in completions]


format_reward.expects_reasoning = True  # a trainer refuses it where the chat template closes the think block itself


def extract_answer(text: str) -> str | None:
    """Stripped content of the last `<answer>` block, or None when there is none."""
    blocks = _ANSWER.findall(text)
    return blocks[-1].strip() if blocks else None


def extract_think(text: str) -> str | None:
    """Stripped content of the last `<think>` block, or None when there is none."""
    blocks = _THINK.findall(text)
    return blocks[-1].strip() if blocks else None
