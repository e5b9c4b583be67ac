"""Accuracy of a multiple-choice answer: the last `<answer>` block against the `solution` column."""

from __future__ import annotations

import re

from rewards.format import extract_answer

MODES = ("option", "letter")

# An option label at the start of a normalised answer: "(b)", "b)", "b.", "b:", "b -", or a bare "b".
# A letter directly followed by more letters ("hemorrhage", "b-cell") is a word, not a label.
_LABEL = re.compile(
    r"\((?P<paren>[a-j])\)\s*[.:-]?"
    r"|(?P<mark>[a-j])\s*[).:]"
    r"|(?P<dash>[a-j])(?:\s+-|-(?=\s))"
    r"|(?P<bare>[a-j])$"
)
# Answers that list letters: "b, c", "b or c", "(a)/(d)".
_LETTER_LIST = re.compile(r"\(?[a-j]\)?(?:\s*(?:,|/|&|and|or)\s*\(?[a-j]\)?)+")
# A second label inside the content: "dense c) whorled", "dense (c)". "c." is not one here, since
# option contents abbreviate species that way ("h. pylori gastritis").
_INNER_LABEL = re.compile(r"(?<!\S)\(?[a-j]\)")


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(". ")


def _names_another_option(content: str) -> bool:
    # "b)" closing a parenthesis opened earlier ("(grade b)") is part of the content, not a label.
    for match in _INNER_LABEL.finditer(content):
        before = content[: match.start()]
        if before.count("(") <= before.count(")"):
            return True
    return False


def parse_option(text: str) -> tuple[str | None, str]:
    """Split an answer such as "(B) Whorled pattern." into ("B", "whorled pattern").

    Whitespace is collapsed, case folded and trailing periods dropped. The letter is None when the
    text does not start with an option label, or names several options ("B or C", "B) x C) y");
    the content is then the whole normalised text.
    """
    norm = _normalise(text)
    label = _LABEL.match(norm)
    if label is None or _LETTER_LIST.fullmatch(norm):
        return None, norm
    content = norm[label.end() :].strip()
    if _names_another_option(content):
        return None, norm
    return next(letter for letter in label.groups() if letter).upper(), content


class AccuracyReward:
    """1.0 when the completion's last `<answer>` block picks the solution's option, else 0.0.

    mode "option" (the paper): letter and option content must both match the solution, e.g.
    "B) Whorled pattern"; a solution without a letter is matched on its content alone.
    mode "letter": the right letter suffices, whatever follows it.
    Rows whose solution is None get None (the reward does not apply to them).
    """

    is_accuracy = True  # its mean is answer correctness: evaluation reports it as `accuracy`

    def __init__(self, mode: str = "option"):
        if mode not in MODES:
            raise ValueError(f"unknown accuracy mode {mode!r}; valid: {', '.join(MODES)}")
        self.mode = mode
        # The trainer logs each reward under its __name__.
        self.__name__ = "accuracy_reward" if mode == "option" else f"accuracy_reward_{mode}"

    def __repr__(self) -> str:
        return f"AccuracyReward(mode={self.mode!r})"

    def __call__(self, prompts, completions: list[str], solution: list[str | None], **columns) -> list[float | None]:
        return [self._score(completion, sol) for completion, sol in zip(completions, solution, strict=True)]

    def _score(self, completion: str, solution: str | None) -> float | None:
        if solution is None:
            return None
        want = parse_option(solution)
        if self.mode == "letter" and want[0] is None:
            raise ValueError(f"accuracy mode 'letter' needs a solution that starts with an option letter, got {solution!r}")
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        got = parse_option(answer)
        if self.mode == "letter":
            return float(got[0] == want[0])
        if want[0] is None:  # a solution with no letter: whatever letter the answer gives, its content decides
            return float(got[1] == want[1])
        return float(got == want)


accuracy_reward = AccuracyReward()
