"""Reward functions: plain callables `f(prompts, completions, **columns) -> list[float | None]`.

`completions` are decoded strings; `columns` are dataset fields, one value per completion. None means
the reward does not apply to that completion. Nothing here depends on the trainer. `JudgeReward` is
async (the trainer awaits it alongside the others) and has a `stats()` the trainer logs.
`overlong_penalty` reads the `completion_ids` column the trainer adds (each completion's token ids).

A reward whose mean is answer correctness carries `is_accuracy = True` (an attribute of the callable
or its class): `AccuracyReward` (`accuracy_reward`) and `AnswerReward` (`answer_reward`; not with
`open_partial_credit`, whose open answers earn their token F1). Evaluation (`grpo.evaluate`, GRPO's
`eval/accuracy`) reports the first such reward's mean as `accuracy`, never the format reward's; mark
your own with `my_reward.is_accuracy = True`.
"""

from rewards.accuracy import AccuracyReward, accuracy_reward, parse_option
from rewards.answer import AnswerReward, TokenOverlap, answer_reward, normalise_answer, token_overlap, vqa_metrics
from rewards.format import extract_answer, extract_think, format_reward
from rewards.judge import DEFAULT_RUBRIC, OPEN_RUBRIC, JudgeReward, parse_scores
from rewards.overlong import overlong_penalty

__all__ = ["format_reward", "AccuracyReward", "accuracy_reward", "extract_answer", "extract_think", "parse_option",
           "AnswerReward", "answer_reward", "vqa_metrics", "normalise_answer", "token_overlap", "TokenOverlap",
           "JudgeReward", "DEFAULT_RUBRIC", "OPEN_RUBRIC", "parse_scores", "overlong_penalty"]
