"""Reward functions: exact values on the edge cases a training run meets."""

import pytest

from rewards import AccuracyReward, accuracy_reward, extract_answer, extract_think, format_reward
from rewards.accuracy import parse_option


def wrap(answer: str, think: str = "Cells are spindle-shaped; options A and C do not fit.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---- format ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x</think><answer>B</answer>", 1.0),
        ("  \n<think>x</think>\n\n<answer>B) Dense</answer>\n ", 1.0),  # whitespace around and between
        ("<think>line one\nline two\n\nline four</think>\n<answer>B</answer>", 1.0),  # multi-line think
        ("<think></think><answer></answer>", 1.0),  # empty blocks still have the format
        ("<answer>B</answer>", 0.0),  # no think
        ("<think>x</think>", 0.0),  # no answer
        ("<think>x</think><answer>B", 0.0),  # unclosed answer
        ("<answer>B</answer><think>x</think>", 0.0),  # wrong order
        ("Sure! <think>x</think><answer>B</answer>", 0.0),  # text before
        ("<think>x</think><answer>B</answer> Hope this helps.", 0.0),  # text after
        ("<think>x</think> so: <answer>B</answer>", 0.0),  # text between the blocks
        ("<THINK>x</THINK><ANSWER>B</ANSWER>", 0.0),  # tags are case-sensitive
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(None, [completion]) == [expected]


def test_format_reward_one_score_per_completion_and_ignores_columns():
    completions = ["<think>a</think><answer>b</answer>", "no tags", "<think>a</think><answer>b</answer>"]
    assert format_reward(["p"] * 3, completions, solution=["A) x"] * 3, image=[None] * 3) == [1.0, 0.0, 1.0]


def test_extractors_take_the_last_block_stripped():
    text = "<think> first </think><answer> A </answer><think>\n second \n</think><answer>\n B) Dense \n</answer>"
    assert extract_answer(text) == "B) Dense"
    assert extract_think(text) == "second"
    assert extract_answer("<think>x</think>") is None
    assert extract_think("<answer>x</answer>") is None


# ---- option parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("B) Whorled pattern", ("B", "whorled pattern")),
        ("B. Whorled pattern", ("B", "whorled pattern")),
        ("(B) Whorled pattern", ("B", "whorled pattern")),
        ("B: Whorled pattern", ("B", "whorled pattern")),
        ("B - Whorled pattern", ("B", "whorled pattern")),
        ("  b)   WHORLED\n pattern. ", ("B", "whorled pattern")),
        ("B", ("B", "")),
        ("(B)", ("B", "")),
        ("B.", ("B", "")),
        ("A) Hemorrhage", ("A", "hemorrhage")),
        ("Hemorrhage", (None, "hemorrhage")),  # starts with a letter of A-J, but it is a word
        ("B-cell lymphoma", (None, "b-cell lymphoma")),
        ("C) H. pylori gastritis", ("C", "h. pylori gastritis")),
        ("A) Hemorrhage (grade B)", ("A", "hemorrhage (grade b)")),  # "B)" closes a parenthesis
        ("B or C", (None, "b or c")),
        ("(A), (D)", (None, "(a), (d)")),
        ("B) Dense C) Whorled", (None, "b) dense c) whorled")),
        ("B) Dense (C)", (None, "b) dense (c)")),
        ("The answer is B", (None, "the answer is b")),
    ],
)
def test_parse_option(text, expected):
    assert parse_option(text) == expected


# ---- accuracy --------------------------------------------------------------------------------------

SOLUTION = "B) Whorled pattern"


@pytest.mark.parametrize(
    "answer, option_score, letter_score",
    [
        ("B) Whorled pattern", 1.0, 1.0),
        ("(b)  whorled PATTERN.", 1.0, 1.0),
        ("B. Whorled pattern", 1.0, 1.0),
        ("B: whorled pattern", 1.0, 1.0),
        ("B - Whorled pattern", 1.0, 1.0),
        ("B) Dense", 0.0, 1.0),  # right letter, wrong content
        ("B", 0.0, 1.0),  # letter only
        ("(B)", 0.0, 1.0),
        ("C) Whorled pattern", 0.0, 0.0),  # right content, wrong letter
        ("Whorled pattern", 0.0, 0.0),  # no letter
        ("B or C", 0.0, 0.0),  # several letters
        ("B) Whorled pattern C) Dense", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_accuracy_modes(answer, option_score, letter_score):
    completion = wrap(answer)
    assert accuracy_reward(None, [completion], solution=[SOLUTION]) == [option_score]
    assert AccuracyReward("letter")(None, [completion], solution=[SOLUTION]) == [letter_score]


def test_accuracy_solution_is_normalised_too():
    assert accuracy_reward(None, [wrap("B) Whorled pattern")], solution=["(B)  Whorled Pattern."]) == [1.0]


def test_accuracy_last_answer_block_wins():
    right_then_wrong = "<think>x</think><answer>B) Whorled pattern</answer><answer>C) Dense</answer>"
    wrong_then_right = "<think>x</think><answer>C) Dense</answer><answer>B) Whorled pattern</answer>"
    assert accuracy_reward(None, [right_then_wrong, wrong_then_right], solution=[SOLUTION] * 2) == [0.0, 1.0]


def test_accuracy_without_answer_block_is_zero():
    for reward in (accuracy_reward, AccuracyReward("letter")):
        assert reward(None, ["B) Whorled pattern", "<think>B) Whorled pattern</think>"], solution=[SOLUTION] * 2) == [0.0, 0.0]


def test_accuracy_none_solution_does_not_apply():
    completions = [wrap("B) Whorled pattern"), wrap("B) Whorled pattern")]
    assert accuracy_reward(None, completions, solution=[None, SOLUTION]) == [None, 1.0]
    assert AccuracyReward("letter")(None, completions, solution=[None, SOLUTION]) == [None, 1.0]


def test_accuracy_ignores_extra_columns():
    scores = accuracy_reward(["q1", "q2"], [wrap("A) Hemorrhage"), wrap("A")], solution=["A) Hemorrhage"] * 2,
                             image=[None, None], question=["q1", "q2"], answer_index=[0, 0])
    assert scores == [1.0, 0.0]


def test_accuracy_names_for_logging():
    assert accuracy_reward.__name__ == "accuracy_reward"
    assert AccuracyReward("letter").__name__ == "accuracy_reward_letter"


def test_accuracy_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match=r"'exact'.*option, letter"):
        AccuracyReward("exact")


def test_a_solution_without_letter_is_matched_on_content():
    completions = [wrap("B) Whorled pattern"), wrap("whorled  pattern."), wrap("B) Dense")]
    assert accuracy_reward(None, completions, solution=["Whorled pattern"] * 3) == [1.0, 1.0, 0.0]


def test_letter_mode_rejects_a_solution_without_letter():
    with pytest.raises(ValueError, match="Whorled pattern"):
        AccuracyReward("letter")(None, [wrap("B")], solution=["Whorled pattern"])
