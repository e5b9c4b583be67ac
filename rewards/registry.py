"""Rewards by name, for config files (`python -m grpo`, docs/command-line.md).

Each entry is a factory: called with the settings a config gives the reward, it returns the reward
callable. A new reward is one line here.
"""

from rewards.accuracy import AccuracyReward
from rewards.answer import AnswerReward
from rewards.format import format_reward
from rewards.judge import JudgeReward
from rewards.overlong import overlong_penalty

REWARDS = {
    "format": lambda: format_reward,  # <think>...</think><answer>...</answer>
    "accuracy": AccuracyReward,  # mode: option (the paper's: letter and text) | letter
    "answer": AnswerReward,  # closed / open / choice rows by answer_type: open_partial_credit, choice_mode
    "judge": JudgeReward,  # the cross-modal process reward: base_url, model, and JudgeReward's other settings
    "overlong": overlong_penalty,  # DAPO's soft overlong punishment: max_completion_length, buffer
}
