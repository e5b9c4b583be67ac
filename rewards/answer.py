"""Answers of every type — closed (yes/no), open (a short phrase), multiple choice — as a reward and as
the benchmarks' metrics.

Conventions (docs/data.md, "Medical VQA benchmarks"): an answer is the last `<answer>` block;
a completion without one answers nothing (wrong, zero overlap). Text is compared after
`normalise_answer` (case, punctuation, the articles a / an / the, whitespace). Closed: the
normalised answer must equal the reference ("yes" / "no", or one of SLAKE's short closed answers),
so "yes, it is" is wrong against "yes". Open: exact match after normalisation; token overlap is
counted on the normalised words with repeats (precision = shared / answer words, recall = shared /
reference words, F1 their harmonic mean). Choice: `rewards.accuracy.AccuracyReward`'s option matching.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

from rewards.accuracy import AccuracyReward
from rewards.format import extract_answer

ANSWER_TYPES = ("closed", "open", "choice")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, the articles a / an / the removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.casefold().translate(_PUNCTUATION)).split())


@dataclass(frozen=True)
class TokenOverlap:
    """Word overlap of an answer with its reference. Read the fields by name."""

    precision: float  # shared words / answer words
    recall: float  # shared words / reference words
    f1: float  # harmonic mean of precision and recall (0 when nothing is shared)


def token_overlap(answer: str | None, reference: str) -> TokenOverlap:
    """Overlap of the normalised words of `answer` (None: no answer) with those of `reference`, repeats counted."""
    got = normalise_answer(answer or "").split()
    want = normalise_answer(reference).split()
    shared = sum((Counter(got) & Counter(want)).values())
    if shared == 0:
        return TokenOverlap(0.0, 0.0, 0.0)
    precision, recall = shared / len(got), shared / len(want)
    return TokenOverlap(precision, recall, 2 * precision * recall / (precision + recall))


def exact_match(answer: str | None, reference: str) -> bool:
    """The answer equals the reference after normalisation; no answer never does."""
    return answer is not None and normalise_answer(answer) == normalise_answer(reference)


def _answer_type(value) -> str:
    kind = value or "choice"  # rows without one (PathMMU, OmniMedVQA) are multiple choice
    if kind not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {', '.join(ANSWER_TYPES)}, got {value!r}")
    return kind


class AnswerReward:
    """One reward for closed, open and multiple-choice rows, read from the completion's last `<answer>` block.

    closed: 1.0 when the normalised answer is the reference (exactly yes or no for a yes/no question).
    open: 1.0 for a normalised exact match, else 0.0; with `open_partial_credit=True` (for training)
        the token F1 against the reference instead, so a near miss earns part of the reward.
    choice (or no `answer_type` column): `AccuracyReward(choice_mode)`, the paper's option matching.
    Rows whose solution is None get None (the reward does not apply to them).
    """

    def __init__(self, open_partial_credit: bool = False, choice_mode: str = "option"):
        self.open_partial_credit = open_partial_credit
        # Its mean is answer correctness (evaluation reports it as `accuracy`), unless open answers earn their F1.
        self.is_accuracy = not open_partial_credit
        self._choice = AccuracyReward(choice_mode)
        self.__name__ = "answer_reward_partial" if open_partial_credit else "answer_reward"

    def __repr__(self) -> str:
        return f"AnswerReward(open_partial_credit={self.open_partial_credit}, choice_mode={self._choice.mode!r})"

    def __call__(self, prompts, completions: list[str], solution: list[str | None], answer_type=None,
                 **columns) -> list[float | None]:
        kinds = answer_type if answer_type is not None else [None] * len(completions)
        return [self.score(completion, sol, kind) for completion, sol, kind in zip(completions, solution, kinds, strict=True)]

    def score(self, completion: str, solution: str | None, answer_type: str | None = None) -> float | None:
        """The reward of one completion against its row's solution and answer type."""
        if solution is None:
            return None
        kind = _answer_type(answer_type)
        if kind == "choice":
            return self._choice(None, [completion], solution=[solution])[0]
        answer = extract_answer(completion)
        if kind == "open" and self.open_partial_credit:
            return token_overlap(answer, solution).f1
        return float(exact_match(answer, solution))


answer_reward = AnswerReward()


def vqa_metrics(predictions: list[str], rows: list[dict]) -> dict[str, dict]:
    """The benchmarks' metrics of `predictions` (completions, one per row) against `rows`.

    Returns {"all": metrics, "<benchmark>": metrics, ...} (a row's `benchmark` field; rows without
    one count in "all" only), each with named fields, fractions in [0, 1], None where no item has
    that type:
      items; closed_items, closed_accuracy (every closed item counts: a malformed or missing answer
      is wrong); open_items, open_exact_match, open_precision, open_recall, open_f1 (token overlap,
      averaged over items); choice_items, choice_accuracy.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    groups: dict[str, list[tuple[str, dict]]] = {"all": []}
    for prediction, row in zip(predictions, rows):
        groups["all"].append((prediction, row))
        if row.get("benchmark") is not None:
            groups.setdefault(row["benchmark"], []).append((prediction, row))
    return {name: _metrics(pairs) for name, pairs in groups.items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _metrics(pairs: list[tuple[str, dict]]) -> dict:
    by_type: dict[str, list[tuple[str, dict]]] = {kind: [] for kind in ANSWER_TYPES}
    for prediction, row in pairs:
        by_type[_answer_type(row.get("answer_type"))].append((prediction, row))
    closed = [answer_reward.score(p, row["solution"], "closed") for p, row in by_type["closed"]]
    choice = [answer_reward.score(p, row["solution"], "choice") for p, row in by_type["choice"]]
    open_answers = [(extract_answer(p), row["solution"]) for p, row in by_type["open"]]
    overlaps = [token_overlap(answer, reference) for answer, reference in open_answers]
    return {
        "items": len(pairs),
        "closed_items": len(closed),
        "closed_accuracy": _mean(closed),
        "open_items": len(open_answers),
        "open_exact_match": _mean([float(exact_match(a, r)) for a, r in open_answers]),
        "open_precision": _mean([o.precision for o in overlaps]),
        "open_recall": _mean([o.recall for o in overlaps]),
        "open_f1": _mean([o.f1 for o in overlaps]),
        "choice_items": len(choice),
        "choice_accuracy": _mean(choice),
    }
