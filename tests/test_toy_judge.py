"""The demo's loopback judge grades toy reasoning by the paper's rubric, from the items' ground truth.

The demo's stage-3 numbers mean something only if this stand-in judge rewards the reasoning the
rubric asks for and penalises what it forbids, and reads the prompt JudgeReward actually sends;
these tests hold it to that.
"""

import asyncio
import os
import sys

import pytest

from data import make_toy_dataset, sft_target, to_prompt_rows
from rewards import extract_answer, extract_think

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from toy_judge_server import grade  # noqa: E402
from toy_judge_stage import start_toy_judge  # noqa: E402

ITEMS = make_toy_dataset(16, seed=3, image_size=56)


def grade_item(item, thinking, answer=None):
    return grade(item["question"], thinking, answer or item["solution"], item["solution"], image_size=56)


@pytest.mark.parametrize("item", ITEMS, ids=[item["family"] for item in ITEMS])
def test_the_reference_explanation_scores_full_marks(item):
    assert grade_item(item, item["explanation"]) == (1.0, 1.0)


def test_reasoning_for_another_class_loses_knowledge_and_empty_reasoning_scores_nothing():
    item = next(i for i in ITEMS if i["family"] == "stain")
    other = next(i for i in make_toy_dataset(64, seed=4, image_size=56)
                 if i["family"] == "stain" and i["solution"] != item["solution"])
    integrity, knowledge = grade_item(item, other["explanation"], other["solution"])
    assert integrity == 1.0 and knowledge <= 0.6  # complete, but it describes the wrong stain and rules the truth out
    assert grade_item(item, "") == (0.0, 0.0)
    assert grade_item(item, "ok ok ok ok") == (0.0, 0.0)


def test_conclusion_that_contradicts_the_answer_is_an_infraction():
    item = next(i for i in ITEMS if i["family"] == "stain")
    wrong = next(option for option in item["options"] if option != item["solution"])
    _, knowledge = grade_item(item, item["explanation"], wrong)
    assert knowledge == pytest.approx(0.6)


def test_toy_targets_parse_into_the_rubric_sections():
    target = sft_target(ITEMS[0])
    assert extract_think(target) == ITEMS[0]["explanation"] and extract_answer(target) == ITEMS[0]["solution"]


def test_judge_reward_through_the_toy_server_scores_reference_reasoning_high_and_wrong_answers_low():
    # End to end as in the demo's stage 3: JudgeReward renders DEFAULT_RUBRIC, the server parses its
    # sections. Were they to drift apart, the server would refuse the prompt and every completion would
    # get the fallback (0.5 for the reference), not these scores.
    rows = to_prompt_rows(ITEMS)
    pool = make_toy_dataset(64, seed=4, image_size=56)
    others = [next(o for o in pool if o["family"] == row["family"] and o["solution"] != row["solution"])
              for row in rows]
    reference = [sft_target(row) for row in rows]
    argued_wrong = [sft_target(other) for other in others]  # a full reasoning for another class
    bare_wrong = [f"<think>I think so.</think><answer>{other['solution']}</answer>" for other in others]
    # The columns as the trainer passes them: every dataset field but the prompt.
    columns = {key: [row.get(key) for row in rows] * 3 for key in rows[0] if key != "prompt"}
    server, judge = start_toy_judge()
    try:
        prompts = [row["prompt"] for row in rows] * 3
        rewards = asyncio.run(judge(prompts, reference + argued_wrong + bare_wrong, **columns))
    finally:
        server.stop()
    n = len(rows)
    assert rewards[:n] == [1.0] * n
    assert all(0.0 < reward <= 0.6 for reward in rewards[n:2 * n])  # the wrong class's features, the truth ruled out
    assert rewards[2 * n:] == [0.0] * n
    stats = judge.stats()
    assert (stats["requests"], stats["failures"], stats["parse_errors"], stats["fallbacks"]) == (3 * n, 0, 0, 0)
