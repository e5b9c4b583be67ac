"""Rewards by name, for config files (`python -m grpo`, README "The command line").

Each entry is a factory: called with the settings a config gives the reward, it returns the reward
callable. A new reward is one line here.
"""

from rewards.accuracy import AccuracyReward
from rewards.answer import AnswerReward
from rewards.format import format_reward
from rewards.judge import JudgeReward

REWARDS = {
    "format": lambda: format_reward,  # <think>...</think><answer>...</answer>
    "accuracy": AccuracyReward,  # mode: option (the paper's: letter and text) | letter
    "answer": AnswerReward,  # closed / open / choice rows by answer_type: open_partial_credit, choice_mode
    "judge": JudgeReward,  # the cross-modal process reward: base_url, model, and JudgeReward's other settings
}
