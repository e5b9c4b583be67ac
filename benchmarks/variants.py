"""The policy-gradient variants side by side on the demo's toy task, from its SFT checkpoint.

    python benchmarks/variants.py                # the full comparison (8 variants x 3 seeds, ~1 h on 2 CPU cores)
    python benchmarks/variants.py --quick        # a smoke run: 2 variants x 1 seed x 2 steps

Each variant trains from the same SFT checkpoint (made here with the demo's SFT stage unless
`--sft-checkpoint` is given) with the same budget: the demo's GRPO settings (imported from
examples/toy_pathology.py, so its defaults are the demo's) with `--steps` steps of
`--prompts-per-step` prompts, two optimizer updates per rollout (num_iterations=2: with one, every
ratio is 1 and GRPO, GSPO and SAPO would make the very same update), and `--seeds` training seeds
(sampling and data order; the data and the checkpoint are the same). Every `--eval-every` steps the
policy is evaluated greedily on the same `--eval-items` held-out items. Writes the results JSON
(`--json`, per variant and seed: final held-out accuracy, the accuracy and KL curves, time), one PNG
with the mean accuracy and KL curves per variant (`--png`), and prints the markdown table of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import toy_pathology as demo  # noqa: E402

from grpo import Trainer, evaluate  # noqa: E402
from grpo.checkpoints import list_checkpoints  # noqa: E402
from rewards import accuracy_reward, format_reward, overlong_penalty  # noqa: E402

# name -> the GRPOConfig settings that make the variant (docs/objective.md has the formulas).
VARIANTS = {
    "GRPO": {},
    "Dr. GRPO": dict(loss_type="dr_grpo", scale_rewards="none"),
    "DAPO": dict(loss_type="dapo", epsilon_high=0.28, dynamic_sampling=True),  # + the overlong penalty reward
    "GSPO": dict(importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
    "CISPO": dict(policy_loss="cispo", loss_type="dapo"),  # TRL's loss_type="cispo"
    "SAPO": dict(policy_loss="sapo"),  # TRL's loss_type="sapo"
    "RLOO": dict(advantage_estimator="rloo", scale_rewards="none"),
    "GRPO 80/20": dict(top_entropy_fraction=0.2),
}
QUICK_VARIANTS = ("GRPO", "DAPO")
LATE_STEPS = 10  # the train-rollout accuracy is averaged over the last this many steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/variants")
    parser.add_argument("--sft-checkpoint", default=None, help="the demo's SFT checkpoint (default: made in --output-dir/sft)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names among: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-iterations", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-items", type=int, default=100)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "variants.json"))
    parser.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "results", "variants.png"))
    parser.add_argument("--rebuild", action="store_true",
                        help="no training: rebuild --json, --png and the table from the runs in --output-dir")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {' and '.join(QUICK_VARIANTS)}, seed 0, 2 steps, 20 eval items, writes under --output-dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.variants, args.seeds, args.steps, args.eval_every, args.eval_items = ",".join(QUICK_VARIANTS), "0", 2, 1, 20
        args.json = os.path.join(args.output_dir, "variants.json")
        args.png = os.path.join(args.output_dir, "variants.png")
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    return args


def sft_checkpoint(args, demo_args, sft_rows, rl_rows) -> str:
    """The demo's SFT stage (its own settings), run once into --output-dir/sft."""
    if args.sft_checkpoint:
        return args.sft_checkpoint
    directory = os.path.join(args.output_dir, "sft")
    found = list_checkpoints(directory)
    if not found:
        sft_args = demo.parse_args(["--stage", "sft", "--output-dir", directory, "--overwrite"])
        demo.run_single_stage(sft_args, sft_rows, rl_rows)
        found = list_checkpoints(directory)
    return found[-1]


def run_dir(args, name: str, seed: int) -> str:
    return os.path.join(args.output_dir, name.replace(" ", "_").replace(".", "").replace("/", "-"), f"seed{seed}")


def train_variant(name: str, seed: int, checkpoint: str, args, demo_args, rl_rows, eval_rows) -> dict:
    out = run_dir(args, name, seed)
    config = demo.grpo_config(demo_args, out, args.steps, eval_steps=args.eval_every)
    config = dataclasses.replace(config, seed=seed, num_iterations=args.num_iterations, overwrite_output_dir=True,
                                 log_completions=0, **VARIANTS[name])
    rewards = [format_reward, accuracy_reward]
    if name == "DAPO":  # DAPO's soft overlong punishment over the last quarter of the length budget
        rewards.append(overlong_penalty(config.max_completion_length, config.max_completion_length // 4))
    t0 = time.time()
    trainer = Trainer(checkpoint, None, rewards, rl_rows, config, eval_dataset=eval_rows,
                      eval_reward_funcs=[accuracy_reward, format_reward])
    history = trainer.train()
    return run_record(history, seed, time.time() - t0)


def run_record(history: list[dict], seed: int, seconds: float) -> dict:
    """One run's numbers from its metrics (the trainer's history, or its metrics.jsonl)."""
    evals = [r for r in history if "eval/accuracy" in r]
    return {
        "seed": seed, "seconds": seconds, "accuracy": evals[-1]["eval/accuracy"],
        "format": evals[-1]["eval/format_reward"],
        "eval_steps": [r["step"] for r in evals], "eval_accuracy": [r["eval/accuracy"] for r in evals],
        "kl": [r["kl"] for r in history], "reward": [r["reward"] for r in history],
        "train_accuracy": [r["rewards/accuracy_reward/mean"] for r in history],
        "clip_ratio": [r["clip_ratio"] for r in history],
        "extra_rollouts": sum(r.get("dynamic_sampling/extra_rollouts", 0) for r in history),
    }


def summarise(runs: list[dict]) -> dict:
    accuracies = [run["accuracy"] for run in runs]
    late = [statistics.mean(run["train_accuracy"][-LATE_STEPS:]) for run in runs]  # sampled rollouts, T = 1
    spread = statistics.stdev if len(runs) > 1 else (lambda values: 0.0)
    return {"accuracy_mean": statistics.mean(accuracies), "accuracy_std": spread(accuracies),
            "lowest_accuracy_mean": statistics.mean(min(run["eval_accuracy"]) for run in runs),
            "train_accuracy_mean": statistics.mean(late), "train_accuracy_std": spread(late),
            "seconds_mean": statistics.mean(run["seconds"] for run in runs)}


def rebuild(args, seeds) -> dict:
    """The results of the runs already in --output-dir, from their metrics.jsonl (seconds from --json)."""
    with open(args.json) as f:
        results = json.load(f)
    for name in args.variants.split(","):
        runs = []
        for seed in seeds:
            with open(os.path.join(run_dir(args, name, seed), "metrics.jsonl")) as f:
                history = [json.loads(line) for line in f]
            seconds = next(r["seconds"] for r in results["variants"][name]["runs"] if r["seed"] == seed)
            runs.append(run_record(history, seed, seconds))
        results["variants"][name] = {"settings": VARIANTS[name], **summarise(runs), "runs": runs}
    return results


def draw(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, variant in results["variants"].items():
        runs = variant["runs"]
        steps = [0] + runs[0]["eval_steps"]
        accuracy = [results["sft_accuracy"]] + [statistics.mean(r["eval_accuracy"][k] for r in runs)
                                                for k in range(len(runs[0]["eval_steps"]))]
        line, = acc_ax.plot(steps, accuracy, marker="o", label=name)
        kl = [statistics.mean(r["kl"][k] for r in runs) for k in range(len(runs[0]["kl"]))]
        kl_ax.plot(range(1, len(kl) + 1), kl, color=line.get_color(), label=name)
    acc_ax.set_title(f"held-out accuracy (greedy, {results['settings']['eval_items']} items; mean of seeds)")
    kl_ax.set_title("KL to the SFT reference (k3, mean of seeds)")
    for ax in (acc_ax, kl_ax):
        ax.set_xlabel("step")
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def table(results: dict) -> str:
    lines = [f"| variant | settings | held-out accuracy (mean ± std, {len(results['settings']['seeds'])} seeds) | "
             f"per seed | lowest on the way | train-rollout accuracy, last {LATE_STEPS} steps | final KL | s / run |",
             "|---|---|---|---|---|---|---|---|",
             f"| SFT checkpoint | | {100 * results['sft_accuracy']:.1f} | | | | | |"]
    for name, variant in results["variants"].items():
        runs = variant["runs"]
        settings = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) + (" + overlong_penalty" if name == "DAPO" else "")
        per_seed = " / ".join(f"{100 * run['accuracy']:.1f}" for run in runs)
        lines.append(f"| {name} | {settings or 'the demo defaults'} | {100 * variant['accuracy_mean']:.1f} ± "
                     f"{100 * variant['accuracy_std']:.1f} | {per_seed} | {100 * variant['lowest_accuracy_mean']:.1f} | "
                     f"{100 * variant['train_accuracy_mean']:.1f} ± {100 * variant['train_accuracy_std']:.1f} | "
                     f"{statistics.mean(run['kl'][-1] for run in runs):.3f} | {variant['seconds_mean']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # the tiny model gains nothing from intra-op threads
    t_start = time.time()
    if args.rebuild:
        results = rebuild(args, [int(s) for s in args.seeds.split(",")])
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        draw(results, args.png)
        print(table(results))
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    demo_args = demo.parse_args(["--prompts-per-step", str(args.prompts_per_step)])
    sft_rows, rl_rows, test_rows = demo.build_data(demo_args)
    eval_rows = test_rows[: args.eval_items]
    checkpoint = sft_checkpoint(args, demo_args, sft_rows, rl_rows)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sft_model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    sft_accuracy = evaluate(sft_model, AutoProcessor.from_pretrained(checkpoint), eval_rows, [accuracy_reward],
                            batch_size=100, max_completion_length=demo_args.max_completion_length)["accuracy"]
    print(f"SFT checkpoint {checkpoint}: held-out accuracy {sft_accuracy:.3f}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"started": started, "command": " ".join(["python", "benchmarks/variants.py", *(argv or sys.argv[1:])]),
               "machine": common.machine(), "sft_checkpoint": checkpoint, "sft_accuracy": sft_accuracy,
               "settings": {"steps": args.steps, "prompts_per_step": args.prompts_per_step,
                            "num_iterations": args.num_iterations, "eval_every": args.eval_every,
                            "eval_items": args.eval_items, "seeds": seeds,
                            "demo_grpo_config": dataclasses.asdict(demo.grpo_config(demo_args, "", args.steps))},
               "variants": {}}
    for name in args.variants.split(","):
        runs = []
        for seed in seeds:
            runs.append(train_variant(name, seed, checkpoint, args, demo_args, rl_rows, eval_rows))
            print(f"[{name} seed {seed}] held-out accuracy {runs[-1]['accuracy']:.3f} in {runs[-1]['seconds']:.0f} s "
                  f"({(time.time() - t_start) / 60:.1f} min so far)", flush=True)
        results["variants"][name] = {"settings": VARIANTS[name], **summarise(runs), "runs": runs}
        results["seconds"] = time.time() - t_start
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:  # after every variant, so an interrupted run keeps what it finished
            json.dump(results, f, indent=1)
    draw(results, args.png)
    print("\n" + table(results))
    print(f"\nresults: {args.json}, curves: {args.png}; total {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
