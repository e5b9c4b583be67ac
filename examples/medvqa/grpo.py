"""GRPO on a mix of medical VQA benchmarks: closed (yes/no), open and multiple-choice questions in one run,
rewarded by `rewards.answer_reward` (each row by its answer type) plus the format reward.

    python examples/medvqa/grpo.py --config examples/medvqa/configs/grpo_mix_3b.yaml [--set grpo.max_steps=100 ...]

Config sections: `model` (hub name, model directory, or a training run: its latest checkpoint),
`benchmarks` (name -> {root, loader settings}, as in evaluate.py, normally the train splits),
`per_benchmark` (at most this many rows of each, a seeded sample; null: all), `rewards` (names from
REWARDS), `reward_weights`, the image budget / on_bad_item for every benchmark, `grpo` (GRPOConfig fields).
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vqa_benchmarks import ROOT, SHARED_KEYS, load_benchmark  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "examples", "pathvlm_r1"))
from common import load_config, parse_args, pick_rewards, train_grpo  # noqa: E402

from grpo import GRPOConfig  # noqa: E402
from rewards import AnswerReward, answer_reward, format_reward  # noqa: E402

# answer_partial: open answers earn their token F1 with the reference (a denser signal for training).
REWARDS = {"answer": answer_reward, "answer_partial": AnswerReward(open_partial_credit=True), "format": format_reward}
SECTIONS = {"model": None, "benchmarks": None, "per_benchmark": None, "rewards": ["answer_partial", "format"],
            "reward_weights": None, "on_bad_item": "error", "max_visual_tokens": None, "min_pixels": None,
            "max_pixels": None, "grpo": None}  # image budget: max_visual_tokens None = 512 unless max_pixels


def load_mix(config: dict, source: str, seed: int) -> list[dict]:
    """Every benchmark's rows (a seeded sample of `per_benchmark` of each when set), in one list."""
    if not config["benchmarks"]:
        raise ValueError(f"{source}: benchmarks: must name at least one benchmark and its root")
    shared = {key: config[key] for key in SHARED_KEYS}
    mix = []
    for name, settings in config["benchmarks"].items():
        rows = load_benchmark(name, settings, shared, source)
        cap = config["per_benchmark"]
        if cap and len(rows) > cap:
            keep = set(random.Random(seed).sample(range(len(rows)), cap))
            rows = [row for k, row in enumerate(rows) if k in keep]
        mix += rows
    counts = {kind: sum(row["answer_type"] == kind for row in mix) for kind in ("closed", "open", "choice")}
    print(f"data: {len(mix)} training rows ({', '.join(f'{n} {kind}' for kind, n in counts.items())})")
    return mix


def main(argv=None):
    args = parse_args(__doc__, argv)
    config = load_config(args.config, args.set, SECTIONS)
    grpo_config = GRPOConfig.from_dict(config["grpo"] or {}, source=f"{args.config} [grpo]")
    reward_funcs, weights = pick_rewards(config, REWARDS, args.config)
    rows = load_mix(config, args.config, grpo_config.seed)
    return train_grpo(config, grpo_config, rows, reward_funcs, weights)


if __name__ == "__main__":
    main()
