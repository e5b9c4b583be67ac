"""CPU demo of the paper's staged method on a synthetic pathology set.

base (random tiny Qwen2.5-VL) -> SFT on explanations (the paper's Alpha) -> GRPO with format +
accuracy rewards (Beta) -> GRPO adding the judge reward against a loopback toy judge (R1); each stage
evaluated greedily on held-out items, including the judge's score of its reasoning. Writes
<output-dir>/results.json, curves.png, and each stage's metrics.jsonl.

    python examples/toy_pathology.py --output-dir runs/toy            # the whole demo (make demo)

One stage alone, e.g. to try scale-out on this CPU (2 processes, DeepSpeed ZeRO-3, gloo):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/toy_pathology.py \\
        --stage grpo --deepspeed zero3 --max-steps 3 --output-dir runs/toy_zero3
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

from data import INSTRUCTION, SYSTEM_PROMPT, TOY_FAMILIES, make_toy_dataset, sft_target, to_prompt_rows  # noqa: E402
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer, evaluate  # noqa: E402
from grpo.distributed import is_main_process, launched_distributed  # noqa: E402
from grpo.lora import is_adapter_checkpoint  # noqa: E402
from grpo.plot import plot_runs  # noqa: E402
from grpo.tiny import FAMILIES, build_tiny_model_and_processor  # noqa: E402
from rewards import accuracy_reward, format_reward  # noqa: E402
from toy_judge_stage import print_counters, start_toy_judge, train_r1  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/toy")
    parser.add_argument("--stage", choices=["all", "sft", "grpo"], default="all",
                        help="all: the staged demo; sft / grpo: that stage alone from --init (default: a fresh tiny model)")
    parser.add_argument("--init", default=None, help="checkpoint directory to start a single stage from")
    parser.add_argument("--overwrite", action="store_true",
                        help="a single stage may replace an earlier run in --output-dir (the staged demo always replaces its own)")
    parser.add_argument("--deepspeed", default=None, help="zero2 | zero3 | a DeepSpeed JSON (single stages, under torchrun)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                        help="the tiny model's architecture (docs/families.md)")
    parser.add_argument("--families", default="stain",
                        help=f"comma-separated question families among {', '.join(TOY_FAMILIES)}")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--sft-items", type=int, default=40, help="SFT items (with explanations)")
    parser.add_argument("--rl-items", type=int, default=500, help="GRPO items (answers only)")
    parser.add_argument("--test-items", type=int, default=200)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--judge-steps", type=int, default=60)
    parser.add_argument("--judge-lr", type=float, default=2e-4)
    parser.add_argument("--grpo-steps", type=int, default=400)
    parser.add_argument("--prompts-per-step", type=int, default=16, help="GRPO prompts per step (x G=4 completions)")
    parser.add_argument("--grpo-lr", type=float, default=5e-4, help="peak learning rate of GRPO (warmup, then cosine decay)")
    parser.add_argument("--grpo-warmup", type=int, default=20, help="GRPO warmup steps")
    parser.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature")
    parser.add_argument("--train-vision-tower", action="store_true",
                        help="train the random vision tower too (default: frozen in every stage, as the paper freezes its pretrained one)")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--compile-decode", choices=["auto", "on", "off"], default="auto",
                        help="GRPO and evaluation decode through a compiled static-shape step (auto: on CUDA only)")
    parser.add_argument("--lora", choices=["continue", "merge"], default=None,
                        help="LoRA (rank 16) instead of full fine-tuning: GRPO continues the SFT adapter (its reference "
                             "is the SFT model), or trains a fresh adapter on the merged SFT model")
    # The `deepspeed` launcher appends --local_rank=N; the trainers read LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def toy_rows(count: int, seed: int, args, source: str) -> list[dict]:
    """`count` prompt rows of the chosen question families."""
    families = tuple(args.families.split(","))
    return to_prompt_rows(make_toy_dataset(count, seed=seed, image_size=args.image_size, families=families), source=source)


def build_data(args):
    # SFT sees few items (explanations are the costly labels), GRPO many (answers only): with 500 SFT
    # items the purple class was learned late or never on some seeds, and GRPO cannot find a class its
    # starting model never samples (docs/results.md: The demo).
    sft_rows = toy_rows(args.sft_items, args.seed, args, "toy-sft")
    rl_rows = toy_rows(args.rl_items, args.seed + 1, args, "toy-rl")
    test_rows = toy_rows(args.test_items, args.seed + 2, args, "toy-test")
    for row in sft_rows:
        row["completion"] = sft_target(row)
    return sft_rows, rl_rows, test_rows


def build_model(args, sft_rows):
    """The tiny model, or --init; the tokenizer is trained on the prompt and target text, so words are few tokens."""
    if args.init:
        return args.init, None
    corpus = [SYSTEM_PROMPT, INSTRUCTION] * 20
    corpus += [row["question"] + "\n" + "\n".join(row["options"]) + "\n" + row["completion"] for row in sft_rows[:300]]
    side = args.image_size * args.image_size
    return build_tiny_model_and_processor(corpus=corpus, seed=args.seed, vocab_size=1024, min_pixels=side, max_pixels=side,
                                          family=args.family)


def lora_settings(args) -> dict | None:
    # The toy's output head is random, not pretrained: it trains whole (its random logits are too flat
    # for an adapter to steer). The adapter covers the vision tower only with --train-vision-tower.
    # Dropout 0.05, as in PEFT's examples (the library's default is 0: docs/lora.md).
    return ({"r": 16, "alpha": 32, "dropout": 0.05, "lora_vision": args.train_vision_tower,
             "modules_to_save": ["lm_head"]} if args.lora else None)


def sft_config(args, output_dir: str, steps: int) -> SFTConfig:
    # The random vision tower stays frozen, as the paper freezes its pretrained one. Its random features
    # already tell the stains apart; trained, its gradients are noise until the language model reads the
    # image tokens, yet Adam moves it at full step size and scrambles those features in a few steps.
    return SFTConfig(output_dir=output_dir, batch_size=16, micro_batch_size=8 if args.deepspeed else 16,
                     learning_rate=args.sft_lr, max_steps=steps, warmup_steps=5, lr_scheduler="cosine",
                     freeze_vision_tower=not args.train_vision_tower, seed=args.seed, save_steps=0, deepspeed=args.deepspeed,
                     overwrite_output_dir=args.stage == "all" or args.overwrite, lora=lora_settings(args))


def compile_setting(args) -> bool | str:
    return {"on": True, "off": False}.get(args.compile_decode, "auto")


def grpo_config(args, output_dir: str, steps: int, eval_steps: int = 0, lora=None) -> GRPOConfig:
    # The paper's G=4 and beta=0.04; the vision tower frozen as in SFT. Warmup, then cosine decay: Adam's
    # first updates move every weight by about the full learning rate whatever its gradient, and at a
    # constant 5e-4 one class could collapse early or late in the run (docs/results.md: The demo).
    return GRPOConfig(output_dir=output_dir, group_size=4, prompts_per_step=args.prompts_per_step,
                      temperature=args.temperature, freeze_vision_tower=not args.train_vision_tower,
                      completions_per_micro_batch=16 if args.deepspeed else 4 * args.prompts_per_step,
                      max_completion_length=args.max_completion_length, learning_rate=args.grpo_lr, lr_scheduler="cosine",
                      warmup_steps=args.grpo_warmup, beta=0.04,
                      max_steps=steps, seed=args.seed, save_steps=0, eval_steps=eval_steps, eval_batch_size=100,
                      deepspeed=args.deepspeed, overwrite_output_dir=args.stage == "all" or args.overwrite, lora=lora,
                      compile_decode=compile_setting(args))


def stage_result(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "format": result["format_reward"],
            "mean_completion_tokens": result["mean_completion_tokens"], "judge": result["judge"]}


def run_single_stage(args, sft_rows, rl_rows):
    """One stage, possibly under torchrun + DeepSpeed; metrics go to <output-dir>/metrics.jsonl."""
    model, processor = build_model(args, sft_rows)
    if args.stage == "sft":
        trainer = SFTTrainer(model, processor, sft_rows, sft_config(args, args.output_dir, args.max_steps or args.sft_steps))
    else:
        fresh = args.lora and not (args.init and is_adapter_checkpoint(args.init))  # an adapter --init continues
        trainer = Trainer(model, processor, [format_reward, accuracy_reward], rl_rows,
                          grpo_config(args, args.output_dir, args.max_steps or args.grpo_steps,
                                      lora=lora_settings(args) if fresh else None))
    t0 = time.time()
    history = trainer.train()
    if is_main_process():
        print(f"[{args.stage}] {len(history)} steps in {time.time() - t0:.1f} s; metrics: "
              f"{os.path.join(args.output_dir, 'metrics.jsonl')}")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    # The tiny model's ops are too small to gain from intra-op threads; several threads only contend.
    torch.set_num_threads(1)
    sft_rows, rl_rows, test_rows = build_data(args)
    if args.stage != "all":
        return run_single_stage(args, sft_rows, rl_rows)
    if launched_distributed() or args.deepspeed:
        raise SystemExit("the staged demo runs in one process; use --stage sft|grpo with torchrun / --deepspeed")
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    model, processor = build_model(args, sft_rows)
    if isinstance(model, str):
        raise SystemExit("--init applies to single stages (--stage sft|grpo)")
    print(f"tiny {type(model).__name__} ({args.family}): {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocab {len(processor.tokenizer)}")
    judge_server, judge = start_toy_judge()
    try:
        run_stages(args, model, processor, sft_rows, rl_rows, test_rows, judge, t_start)
    finally:
        judge_server.stop()


def run_stages(args, model, processor, sft_rows, rl_rows, test_rows, judge, t_start):
    """base -> SFT -> GRPO -> GRPO + judge, each evaluated; writes results.json and curves.png."""
    out = args.output_dir
    scorers = [accuracy_reward, format_reward, judge]

    def run_eval(name, m):
        result = evaluate(m, processor, test_rows, scorers, batch_size=100, max_completion_length=args.max_completion_length,
                          output_path=os.path.join(out, f"eval_{name}.jsonl"), compile_decode=compile_setting(args))
        print(f"[{name}] held-out accuracy {result['accuracy']:.3f}, format {result['format_reward']:.3f}, "
              f"tokens {result['mean_completion_tokens']:.1f}, judge {result['judge']:.3f}")
        return stage_result(result)

    stages = {"base": run_eval("base", model)}

    # Stage 1 (Alpha): SFT on the explanations.
    sft = SFTTrainer(model, processor, sft_rows, sft_config(args, os.path.join(out, "sft"), args.sft_steps))
    sft.train()
    stages["sft"] = run_eval("sft", sft.model)

    # Stage 2 (Beta): GRPO from the SFT model with format + accuracy rewards. Under --lora the SFT
    # model is base + adapter: GRPO continues that adapter, or trains a fresh one on the merged model.
    judge.stats()  # its evaluations' counters start from zero: the standalone evaluations above are not this stage's
    beta_start = sft.model.merge_and_unload() if args.lora == "merge" else sft.model
    grpo = Trainer(copy.deepcopy(beta_start), processor, [format_reward, accuracy_reward], rl_rows,
                   grpo_config(args, os.path.join(out, "grpo"), args.grpo_steps, eval_steps=max(1, args.grpo_steps // 5),
                               lora=lora_settings(args) if args.lora == "merge" else None),
                   eval_dataset=test_rows[:100], eval_reward_funcs=scorers)
    grpo.train()
    stages["grpo"] = run_eval("grpo", grpo.model)

    # Stage 3 (R1): GRPO from Beta adding the judge's process reward.
    r1_config = grpo_config(args, os.path.join(out, "grpo_judge"), args.judge_steps, eval_steps=max(1, args.judge_steps // 4))
    r1_config.learning_rate = args.judge_lr
    r1_model, counters = train_r1(grpo.model, processor, rl_rows, test_rows[:100], judge, scorers, r1_config)
    stages["grpo_judge"] = {**run_eval("grpo_judge", r1_model), "judge_counters": counters}

    elapsed = time.time() - t_start
    results = {"stages": stages, "seconds": elapsed, "settings": vars(args)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    curves = os.path.join(out, "curves.png")
    plot_runs([os.path.join(out, stage) for stage in ("sft", "grpo", "grpo_judge")], curves)
    print("\n| model | accuracy | format | mean completion tokens | mean judge score |\n|---|---|---|---|---|")
    for name, r in stages.items():
        print(f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['format']:.1f} | {r['mean_completion_tokens']:.1f} "
              f"| {r['judge']:.3f} |")
    print_counters(counters, os.path.join(out, "grpo_judge"))
    print(f"\nresults: {os.path.join(out, 'results.json')}, curves: {curves}")
    print(f"total time {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
