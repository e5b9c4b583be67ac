"""Rows -> chat messages: the system prompt, the answer-format instruction and the SFT target.

A row is a dict with at least `image`, `question`, `options` (list of "A) ..." strings) and `solution`
(one of the options); `explanation` is optional. Messages use the Hugging Face multimodal chat format
with an `{"type": "image"}` placeholder: the image itself stays in the row's `image` field.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are an expert pathology assistant. You answer questions about histopathology images "
    "by examining the visible tissue and cell features."
)

INSTRUCTION = (
    "First reason step by step inside <think> </think>: describe the relevant image features and rule out "
    "wrong options. Then give the final answer inside <answer> </answer> as the option letter followed by "
    "its text, for example <answer>B) Whorled pattern</answer>."
)

# The reasoning written into the SFT target for rows that come without an explanation.
_FALLBACK_THINK = "I compare the image features with each option."

_REQUIRED_FIELDS = ("image", "question", "options", "solution")


def build_messages(row: dict, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for one row: an optional system turn, then a user turn with the image and the text.

    The user text is the question, the options one per line, then INSTRUCTION. No system turn is
    added when `system_prompt` is None or empty.
    """
    text = "\n".join([row["question"].strip(), *(option.strip() for option in row["options"]), INSTRUCTION])
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
    return messages


def sft_target(row: dict) -> str:
    """The completion SFT trains on: `<think>{explanation}</think><answer>{solution}</answer>`.

    A row whose explanation is missing or blank gets a one-sentence placeholder reasoning instead.
    """
    explanation = (row.get("explanation") or "").strip() or _FALLBACK_THINK
    return f"<think>{explanation}</think><answer>{row['solution'].strip()}</answer>"


def to_prompt_rows(rows: list[dict], system_prompt: str | None = SYSTEM_PROMPT, source: str = "dataset") -> list[dict]:
    """Validated copies of `rows`, each with a `prompt` key holding its chat messages.

    Raises ValueError naming `source`, the row index and the problem when a required field (image,
    question, options, solution) is missing or empty, `options` is not a list, or the solution is
    not one of the options (compared after stripping whitespace). Input rows are left unchanged.
    """
    prompt_rows = []
    for index, row in enumerate(rows):
        for field in _REQUIRED_FIELDS:
            value = row.get(field)
            if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
                raise ValueError(f"{source} row {index}: missing field {field!r}")
        if not isinstance(row["options"], list):
            got = type(row["options"]).__name__
            raise ValueError(f"{source} row {index}: field 'options' must be a list, got {got}")
        options = [str(option).strip() for option in row["options"]]
        if str(row["solution"]).strip() not in options:
            raise ValueError(f"{source} row {index}: solution {row['solution']!r} is not one of the options {options}")
        prompt_rows.append({**row, "prompt": build_messages(row, system_prompt)})
    return prompt_rows
