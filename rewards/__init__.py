"""Reward functions: plain callables `f(prompts, completions, **columns) -> list[float | None]`.

`completions` are decoded strings; `columns` are dataset fields, one value per completion. None means
the reward does not apply to that completion. Nothing here depends on the trainer. `JudgeReward` is
async (the trainer awaits it alongside the others) and has a `stats()` the trainer logs.
"""

from rewards.accuracy import AccuracyReward, accuracy_reward, parse_option
from rewards.answer import AnswerReward, TokenOverlap, answer_reward, normalise_answer, token_overlap, vqa_metrics
from rewards.format import extract_answer, extract_think, format_reward
from rewards.judge import DEFAULT_RUBRIC, OPEN_RUBRIC, JudgeReward, parse_scores

__all__ = ["format_reward", "AccuracyReward", "accuracy_reward", "extract_answer", "extract_think", "parse_option",
           "AnswerReward", "answer_reward", "vqa_metrics", "normalise_answer", "token_overlap", "TokenOverlap",
           "JudgeReward", "DEFAULT_RUBRIC", "OPEN_RUBRIC", "parse_scores"]
