"""GRPO stage of PathVLM-R1 (Beta, R1, Epsilon): format + accuracy rewards, plus the judge for R1.

    python examples/pathvlm_r1/grpo.py --config examples/pathvlm_r1/configs/beta_7b.yaml [--set grpo.max_steps=100 ...]

Config sections: `model` (hub name, model directory, or a previous stage's output directory: its
latest checkpoint is used), `data` (PathMMU root, split manifest and part), `rewards` (names from
REWARDS), `reward_weights` (one per reward, default 1), `judge` (optional: the cross-modal process
reward, `rewards.JudgeReward` settings plus `weight`), `grpo` (GRPOConfig fields).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import load_config, load_part, parse_args, pick_rewards, train_grpo  # noqa: E402

from grpo import GRPOConfig  # noqa: E402
from rewards import accuracy_reward, format_reward  # noqa: E402

REWARDS = {"format": format_reward, "accuracy": accuracy_reward}
SECTIONS = {"model": None, "data": None, "rewards": ["format", "accuracy"], "reward_weights": None, "judge": None,
            "grpo": None}


def make_judge(settings: dict, source: str):
    """The cross-modal process reward from the `judge:` section (its `weight` is returned apart)."""
    settings = dict(settings)
    weight = float(settings.pop("weight", 1.0))
    try:
        from rewards import JudgeReward
    except ImportError as error:
        raise RuntimeError(f"{source}: the judge: section needs rewards.JudgeReward, which this installation does not "
                           f"have ({error}). Update the repository, or train without the judge: --set judge=null") from error
    try:
        return JudgeReward(**settings), weight
    except TypeError as error:
        raise ValueError(f"{source} [judge]: {error}") from error


def build_rewards(config: dict, source: str) -> tuple[list, list[float]]:
    funcs, weights = pick_rewards(config, REWARDS, source)
    if config["judge"]:
        judge, weight = make_judge(config["judge"], source)
        funcs.append(judge)
        weights.append(weight)
    return funcs, weights


def main(argv=None):
    args = parse_args(__doc__, argv)
    config = load_config(args.config, args.set, SECTIONS)
    grpo_config = GRPOConfig.from_dict(config["grpo"] or {}, source=f"{args.config} [grpo]")
    reward_funcs, weights = build_rewards(config, args.config)
    rows = load_part(config["data"], args.config)
    return train_grpo(config, grpo_config, rows, reward_funcs, weights)


if __name__ == "__main__":
    main()
