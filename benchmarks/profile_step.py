"""Where one GRPO step's time goes, stage by stage, with and without the shared-prompt path.

    python benchmarks/profile_step.py --config paper-shape-small
    python benchmarks/profile_step.py --config paper-shape-small --family gemma3

Times each stage of our step on the benchmark model (one process, `--repeats` runs per stage, the
median printed): the vision tower over the step's images, the rollout (prefill + decoding), the
reference log-probs and the policy forward + backward, once through the shared path and once
through the plain path (every completion forwards its own prompt and image). `--family` picks the
model family as in bench_step.py (common.FAMILY_SHAPES; Qwen2.5-VL by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from grpo.logprobs import group_logprobs, with_image_features  # noqa: E402
from grpo.models import family_for  # noqa: E402
from grpo.prompts import encode_prompts  # noqa: E402
from grpo.sampling import SamplingParams, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(common.CONFIGS), default="paper-shape-small")
    parser.add_argument("--family", choices=common.FAMILIES, default=common.DEFAULT_FAMILY,
                        help="model family (paper-shape-small: common.FAMILY_SHAPES)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the stage medians here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = common.CONFIGS[args.config]
    model, processor = common.build(args.config, args.family)
    family = family_for(model, processor)
    for module in family.vision_modules(model):  # frozen, as in the benchmark
        module.requires_grad_(False)
    G, C, B = shape["group_size"], shape["max_completion_length"], shape["prompts_per_step"]
    prompts = encode_prompts(family, common.rows_for(args.config, B, args.family), list(range(B)), max_prompt_length=4096)
    family.forbidden_ids = family.forbidden_ids + family.eos_ids  # every completion runs to the limit: same work
    prompt_index = [i // G for i in range(B * G)]

    def rollout(p, shared=True):
        with torch.no_grad():
            return generate(family, model.eval(), p, SamplingParams(max_new_tokens=C), group_size=G,
                            generator=torch.Generator().manual_seed(0), shared_prefix=shared)

    cached = with_image_features(family, model, prompts)
    out = rollout(cached)

    def reference(p, shared):
        with torch.no_grad():
            group_logprobs(family, model.eval(), p, prompt_index, out.ids, out.mask, shared_prefix=shared)

    def policy(p, shared):
        model.train().zero_grad(set_to_none=True)
        group_logprobs(family, model, p, prompt_index, out.ids, out.mask, shared_prefix=shared).sum().backward()

    stages = {
        "vision tower, the step's B images (shared path: once per step)": lambda: with_image_features(family, model, prompts),
        "rollout, shared (cached features, B prefills, decoding)": lambda: rollout(cached),
        "rollout, plain (pixels, B * G prefills, decoding)": lambda: rollout(prompts, False),
        "reference log-probs, shared": lambda: reference(cached, True),
        "reference log-probs, plain": lambda: reference(prompts, False),
        "policy forward + backward, shared": lambda: policy(cached, True),
        "policy forward + backward, plain": lambda: policy(prompts, False),
    }
    medians = {}
    for name, func in stages.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            func()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
        print(f"{medians[name]:8.3f} s  {name}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "family": args.family, "shape": shape,
                       # for a family other than Qwen2.5-VL, what differs from `shape` (as in bench_step.py)
                       "family_shape": common.FAMILY_SHAPES.get(args.family) if args.config == "paper-shape-small" else None,
                       "model": common.describe(model, processor, args.config, args.family), "stage_s_median": medians,
                       "machine": common.machine(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, f, indent=1)


if __name__ == "__main__":
    main()
