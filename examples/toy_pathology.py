"""CPU demo of the paper's staged method on a synthetic pathology set.

base (random tiny Qwen2.5-VL) -> SFT on explanations (the paper's Alpha) -> GRPO with format +
accuracy rewards (Beta) -> GRPO adding the judge reward against a loopback toy judge (R1); each stage
evaluated greedily on held-out items, including the judge's score of its reasoning. Writes
<output-dir>/results.json, curves.png, and each stage's metrics.jsonl.

    python examples/toy_pathology.py --output-dir runs/toy
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import make_toy_dataset, sft_target, to_prompt_rows  # noqa: E402
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer, evaluate  # noqa: E402
from grpo.tiny import build_tiny_model_and_processor  # noqa: E402
from rewards import accuracy_reward, format_reward  # noqa: E402
from toy_judge_stage import print_counters, start_toy_judge, train_r1  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--sft-items", type=int, default=1000)
    parser.add_argument("--rl-items", type=int, default=1000)
    parser.add_argument("--test-items", type=int, default=200)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--grpo-lr", type=float, default=1e-3)
    parser.add_argument("--judge-steps", type=int, default=60)
    parser.add_argument("--judge-lr", type=float, default=5e-4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    return parser.parse_args()


def stage_result(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "format": result["format_reward"],
            "mean_completion_tokens": result["mean_completion_tokens"], "judge": result["judge"]}


def draw_curves(output_dir: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping curves.png (pip install -e '.[demo]')")
        return None
    with open(os.path.join(output_dir, "grpo", "metrics.jsonl")) as f:
        grpo = [json.loads(line) for line in f]
    with open(os.path.join(output_dir, "sft", "metrics.jsonl")) as f:
        sft = [json.loads(line) for line in f]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[0].set_title("SFT loss (per token)")
    steps = [r["step"] for r in grpo]
    axes[1].plot(steps, [r["reward"] for r in grpo], label="total")
    for key in ("rewards/format_reward/mean", "rewards/accuracy_reward/mean"):
        axes[1].plot(steps, [r[key] for r in grpo], label=key.split("/")[1])
    axes[1].legend()
    axes[1].set_title("GRPO reward (train rollouts)")
    evals = [r for r in grpo if "eval/accuracy" in r]
    axes[2].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], marker="o")
    axes[2].set_title("held-out accuracy (greedy)")
    axes[3].plot(steps, [r["kl"] for r in grpo])
    axes[3].set_title("KL to reference (k3)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(output_dir, "curves.png")
    fig.savefig(path, dpi=100)
    return path


def main():
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.time()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)

    sft_rows = to_prompt_rows(make_toy_dataset(args.sft_items, seed=args.seed, image_size=args.image_size), source="toy-sft")
    rl_rows = to_prompt_rows(make_toy_dataset(args.rl_items, seed=args.seed + 1, image_size=args.image_size), source="toy-rl")
    test_rows = to_prompt_rows(make_toy_dataset(args.test_items, seed=args.seed + 2, image_size=args.image_size), source="toy-test")
    for row in sft_rows:
        row["completion"] = sft_target(row)
    corpus = [row["question"] + "\n" + "\n".join(row["options"]) + "\n" + row["completion"] for row in sft_rows[:300]]
    side = args.image_size * args.image_size
    model, processor = build_tiny_model_and_processor(corpus=corpus, seed=args.seed, vocab_size=1024,
                                                      min_pixels=side, max_pixels=side)
    print(f"tiny Qwen2.5-VL: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(processor.tokenizer)}")
    judge_server, judge = start_toy_judge()
    scorers = [accuracy_reward, format_reward, judge]

    def run_eval(name, m):
        result = evaluate(m, processor, test_rows, scorers, batch_size=100, max_completion_length=args.max_completion_length,
                          output_path=os.path.join(out, f"eval_{name}.jsonl"))
        print(f"[{name}] held-out accuracy {result['accuracy']:.3f}, format {result['format_reward']:.3f}, "
              f"tokens {result['mean_completion_tokens']:.1f}, judge {result['judge']:.3f}")
        return stage_result(result)

    stages = {"base": run_eval("base", model)}

    # Stage 1 (Alpha): SFT on the explanations. The random vision tower is trained too: there is no
    # pretrained encoder to keep (the paper freezes a pretrained one).
    sft = SFTTrainer(model, processor, sft_rows, SFTConfig(
        output_dir=os.path.join(out, "sft"), batch_size=16, micro_batch_size=16, learning_rate=args.sft_lr,
        max_steps=args.sft_steps, warmup_steps=5, freeze_vision_tower=False, seed=args.seed, save_steps=0))
    sft.train()
    stages["sft"] = run_eval("sft", model)

    # Stage 2 (Beta): GRPO from the SFT model with format + accuracy rewards, vision tower frozen.
    grpo = Trainer(copy.deepcopy(model), processor, [format_reward, accuracy_reward], rl_rows, GRPOConfig(
        output_dir=os.path.join(out, "grpo"), group_size=4, prompts_per_step=8, completions_per_micro_batch=32,
        max_completion_length=args.max_completion_length, learning_rate=args.grpo_lr, beta=0.04, max_steps=args.grpo_steps,
        seed=args.seed, save_steps=0, eval_steps=max(1, args.grpo_steps // 5), eval_batch_size=100),
        eval_dataset=test_rows[:100], eval_reward_funcs=scorers)
    grpo.train()
    stages["grpo"] = run_eval("grpo", grpo.model)

    # Stage 3 (R1): GRPO from Beta adding the judge's process reward.
    r1_model, counters = train_r1(grpo.model, processor, rl_rows, test_rows[:100], judge, scorers,
                                  output_dir=os.path.join(out, "grpo_judge"), steps=args.judge_steps,
                                  learning_rate=args.judge_lr, max_completion_length=args.max_completion_length,
                                  seed=args.seed)
    stages["grpo_judge"] = {**run_eval("grpo_judge", r1_model), "judge_counters": counters}
    judge_server.stop()

    elapsed = time.time() - t_start
    results = {"stages": stages, "seconds": elapsed, "settings": vars(args)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    curves = draw_curves(out)
    print(f"\n| model | accuracy | format | mean completion tokens | mean judge score |\n|---|---|---|---|---|")
    for name, r in stages.items():
        print(f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['format']:.1f} | {r['mean_completion_tokens']:.1f} "
              f"| {r['judge']:.3f} |")
    print_counters(counters, os.path.join(out, "grpo_judge"))
    print(f"\nresults: {os.path.join(out, 'results.json')}" + (f", curves: {curves}" if curves else ""))
    print(f"total time {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
