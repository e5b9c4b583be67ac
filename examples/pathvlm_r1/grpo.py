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

from common import load_config, load_part, load_policy, parse_args, save_run_config  # noqa: E402

from grpo import GRPOConfig, Trainer  # noqa: E402
from grpo.config import unknown_key_error  # noqa: E402
from grpo.training import check_output_dir  # noqa: E402
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
    funcs = []
    for name in config["rewards"]:
        if name not in REWARDS:
            raise unknown_key_error(name, REWARDS, f"{source} [rewards]")
        funcs.append(REWARDS[name])
    weights = [float(w) for w in config["reward_weights"]] if config["reward_weights"] is not None else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{source}: {len(weights)} reward_weights for {len(funcs)} rewards {config['rewards']}")
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
    # Before loading the model or writing run_config.yaml: an earlier run there is never half-replaced.
    check_output_dir(grpo_config.output_dir, grpo_config.resume_from_checkpoint, grpo_config.overwrite_output_dir)
    model, processor = load_policy(config["model"], grpo_config.dtype)
    save_run_config(config, grpo_config.output_dir)
    trainer = Trainer(model, processor, reward_funcs, rows, grpo_config, reward_weights=weights)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
