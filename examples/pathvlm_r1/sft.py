"""Supervised fine-tuning stage of PathVLM-R1 (Alpha, Gamma, Delta): `<think>explanation</think><answer>option</answer>`.

    python examples/pathvlm_r1/sft.py --config examples/pathvlm_r1/configs/alpha_7b.yaml [--set sft.max_steps=100 ...]

Config sections: `model` (hub name, model directory, or a previous stage's output directory: its
latest checkpoint is used), `data` (PathMMU root, split manifest and part), `sft` (SFTConfig fields).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import load_config, load_part, load_policy, parse_args, save_run_config, sized_for  # noqa: E402

from data import sft_target  # noqa: E402
from grpo import SFTConfig, SFTTrainer  # noqa: E402
from grpo.checkpoints import check_output_dir  # noqa: E402

SECTIONS = {"model": None, "data": None, "sft": None}


def main(argv=None):
    args = parse_args(__doc__, argv)
    config = load_config(args.config, args.set, SECTIONS)
    sft_config = SFTConfig.from_dict(config["sft"] or {}, source=f"{args.config} [sft]")
    rows = load_part(config["data"], args.config)
    for row in rows:
        row["completion"] = sft_target(row)  # PathMMU's explanation is the reasoning to imitate
    # Before loading the model or writing run_config.yaml: an earlier run there is never half-replaced.
    check_output_dir(sft_config.output_dir, sft_config.resume_from_checkpoint, sft_config.overwrite_output_dir)
    model, processor = load_policy(config["model"], sft_config.dtype)
    save_run_config(config, sft_config.output_dir)
    trainer = SFTTrainer(model, processor, sized_for(rows, model, processor), sft_config)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
