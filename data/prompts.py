"""Rows -> chat messages: the system prompt, the answer-format instruction and the SFT target.

A row is a dict with at least `image` (or `images`, a list), `question` and `solution`; its
`answer_type` says how it is answered: "choice" (the default when absent: `options` is a list of
"A) ..." strings and the solution one of them), "closed" (a yes/no question, or one of SLAKE's
closed questions with a short fixed answer) or "open" (a short free answer). `explanation` is
optional. Messages use the Hugging Face multimodal chat format with one `{"type": "image"}`
placeholder per image: the images themselves stay in the row's `image` / `images` field.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are an expert pathology assistant. You answer questions about histopathology images "
    "by examining the visible tissue and cell features."
)

# For the medical VQA benchmarks (radiology, pathology, figures from papers): not only histopathology.
MEDICAL_SYSTEM_PROMPT = (
    "You are an expert medical imaging assistant. You answer questions about medical images "
    "by examining the visible anatomy and findings."
)

_THINK = "First reason step by step inside <think> </think>: describe the relevant image features"

INSTRUCTION = (
    f"{_THINK} and rule out "
    "wrong options. Then give the final answer inside <answer> </answer> as the option letter followed by "
    "its text, for example <answer>B) Whorled pattern</answer>."
)

YES_NO_INSTRUCTION = (
    f"{_THINK}. Then give the final answer inside <answer> </answer> as one word, yes or no, "
    "for example <answer>yes</answer>."
)

SHORT_ANSWER_INSTRUCTION = (
    f"{_THINK}. Then give the final answer inside <answer> </answer> as a word or a short phrase, "
    "for example <answer>left lung</answer>."
)

ANSWER_TYPES = ("choice", "closed", "open")
YES_NO = ("yes", "no")

# The reasoning written into the SFT target for rows that come without an explanation.
_FALLBACK_THINK = "I compare the image features with each option."


def answer_type(row: dict) -> str:
    """The row's answer type; rows without one (PathMMU, OmniMedVQA) are multiple choice."""
    return row.get("answer_type") or "choice"


def instruction(row: dict) -> str:
    """The answer-format instruction for the row's answer type (a closed question answered yes or no
    asks for yes or no; SLAKE's other closed questions, like open ones, ask for a short phrase)."""
    kind = answer_type(row)
    if kind == "choice":
        return INSTRUCTION
    if kind == "closed" and str(row["solution"]).strip().casefold() in YES_NO:
        return YES_NO_INSTRUCTION
    return SHORT_ANSWER_INSTRUCTION


def build_messages(row: dict, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for one row: an optional system turn, then a user turn with the image(s) and the text.

    The user text is the question, the options one per line (multiple choice only), then the
    instruction for the row's answer type. No system turn is added when `system_prompt` is None or empty.
    """
    options = (row.get("options") or []) if answer_type(row) == "choice" else []
    text = "\n".join([row["question"].strip(), *(option.strip() for option in options), instruction(row)])
    images = len(row["images"]) if row.get("images") is not None else 1
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]})
    return messages


def sft_target(row: dict) -> str:
    """The completion SFT trains on: `<think>{explanation}</think><answer>{solution}</answer>`.

    A row whose explanation is missing or blank gets a one-sentence placeholder reasoning instead.
    """
    explanation = (row.get("explanation") or "").strip() or _FALLBACK_THINK
    return f"<think>{explanation}</think><answer>{row['solution'].strip()}</answer>"


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0)


def to_prompt_rows(rows: list[dict], system_prompt: str | None = SYSTEM_PROMPT, source: str = "dataset") -> list[dict]:
    """Validated copies of `rows`, each with a `prompt` key holding its chat messages.

    Raises ValueError naming `source`, the row index and the problem when a required field (image or
    images, question, solution; options for multiple choice) is missing or empty, `answer_type` is
    not one of ANSWER_TYPES, `options` is not a list, or the solution is not one of the options
    (compared after stripping whitespace). Input rows are left unchanged.
    """
    prompt_rows = []
    for index, row in enumerate(rows):
        kind = answer_type(row)
        if kind not in ANSWER_TYPES:
            raise ValueError(f"{source} row {index}: field 'answer_type' must be one of {', '.join(ANSWER_TYPES)}, got {kind!r}")
        if _empty(row.get("image")) and _empty(row.get("images")):
            raise ValueError(f"{source} row {index}: missing field 'image'")
        for field in ("question", "options", "solution") if kind == "choice" else ("question", "solution"):
            if _empty(row.get(field)):
                raise ValueError(f"{source} row {index}: missing field {field!r}")
        if kind == "choice":
            if not isinstance(row["options"], list):
                got = type(row["options"]).__name__
                raise ValueError(f"{source} row {index}: field 'options' must be a list, got {got}")
            options = [str(option).strip() for option in row["options"]]
            if str(row["solution"]).strip() not in options:
                raise ValueError(f"{source} row {index}: solution {row['solution']!r} is not one of the options {options}")
        prompt_rows.append({**row, "prompt": build_messages(row, system_prompt)})
    return prompt_rows
