"""The demo's GRPO step, from its SFT checkpoint: where the time goes, a rollout at fixed work, the
matmul bound.

    python examples/toy_pathology.py --stage sft --output-dir runs/toy_sft     # once: the SFT checkpoint
    python benchmarks/demo_step.py --init runs/toy_sft/checkpoint-300 --json benchmarks/results/demo_step.json
    python benchmarks/demo_step.py --init runs/toy_sft/checkpoint-300 --compile-decode on

The model, data and settings are those of `examples/toy_pathology.py`'s GRPO stage (16 prompts x G = 4,
64-token completions; one torch thread, as the demo runs). Three measurements, each printed and
written to `--json`:

- **stages**: `--steps` GRPO steps timed stage by stage (rollout, rewards, reference log-probs, update);
  medians over the steps after `--warmup`. The completions are sampled, so their lengths, and with them
  the later stages' work, depend on the random stream.
- **rollout**: `--rollouts` rollouts of one step's prompts with the end of turn forbidden, every
  completion running to its 64-token limit: the same work whatever the code samples, for comparing two
  versions of it.
- **flops** (`--flops`): one step's FLOPs counted by `torch.utils.flop_counter` (matrix products,
  attention, the tower's convolution), and one thread's matmul rate at the model's shapes; their ratio
  is the step's time at the matmul bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import common  # noqa: E402
import toy_pathology  # noqa: E402

from grpo import Trainer  # noqa: E402
from rewards import accuracy_reward, format_reward  # noqa: E402

STAGES = ("rollout", "score", "logprob_passes", "update")  # the Trainer's methods, in step order


def build_trainer(args) -> Trainer:
    demo = toy_pathology.parse_args(["--stage", "grpo", "--init", args.init, "--output-dir", args.output_dir,
                                     "--overwrite", "--compile-decode", args.compile_decode])
    sft_rows, rl_rows, _ = toy_pathology.build_data(demo)
    model, processor = toy_pathology.build_model(demo, sft_rows)
    steps = args.warmup + args.steps + 1
    return Trainer(model, processor, [format_reward, accuracy_reward], rl_rows,
                   toy_pathology.grpo_config(demo, args.output_dir, steps))


def time_stages(trainer: Trainer, warmup: int, steps: int) -> dict:
    """Median seconds per step and per stage over `steps` steps after `warmup`."""
    times = {name: [] for name in STAGES}

    def timed(name, method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = method(*args, **kwargs)
            times[name].append(time.perf_counter() - start)
            return out
        return run

    for name in STAGES:
        setattr(trainer, name, timed(name, getattr(trainer, name)))
    step_times, lengths = [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        record, _ = trainer.train_step()
        step_times.append(time.perf_counter() - start)
        lengths.append(record["completion_length/mean"])
    for name in STAGES:  # the plain methods again
        delattr(trainer, name)
    out = {"step_s": statistics.median(step_times[warmup:]),
           "completion_length_mean": statistics.mean(lengths[warmup:])}
    out.update({f"{name}_s": statistics.median(values[warmup:]) for name, values in times.items()})
    return out


def time_rollouts(trainer: Trainer, rollouts: int) -> dict:
    """Rollouts of step 0's prompts with every completion running to the limit (end of turn forbidden)."""
    family = trainer.family
    saved = family.forbidden_ids
    family.forbidden_ids = sorted(set(saved) | set(family.eos_ids))
    rows, indices = trainer._rows_for_step(0)
    times = []
    try:
        for i in range(rollouts + 2):  # two untimed: the first allocations (and a compilation)
            start = time.perf_counter()
            batch = trainer.rollout(rows, indices, torch.Generator().manual_seed(i))
            times.append(time.perf_counter() - start)
    finally:
        family.forbidden_ids = saved
    tokens = int(batch.completion_mask.sum())
    assert tokens == batch.completion_mask.numel(), "a completion ended early"
    return {"rollout_s": statistics.median(times[2:]), "tokens": tokens, "rows": batch.completion_mask.shape[0]}


def matmul_bound(trainer: Trainer) -> dict:
    """One step's FLOPs and the time they take at one thread's matmul rate on the model's shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    flops = counter.get_total_flops()
    text = trainer.model.config.get_text_config()
    rates = []
    for k, n in ((text.hidden_size, text.intermediate_size), (text.intermediate_size, text.hidden_size),
                 (text.hidden_size, text.vocab_size)):
        a, b = torch.randn(4096, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(50):
            a @ b
        rates.append(2 * 4096 * k * n * 50 / (time.perf_counter() - start))
    rate = statistics.median(rates)
    return {"gflop_per_step": flops / 1e9, "matmul_gflop_per_s": [r / 1e9 for r in rates], "bound_s": flops / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="the demo's SFT checkpoint directory (checkpoint-300)")
    parser.add_argument("--output-dir", default="runs/demo_step", help="the GRPO run's directory (replaced)")
    parser.add_argument("--compile-decode", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--rollouts", type=int, default=10, help="timed fixed-work rollouts")
    parser.add_argument("--flops", action="store_true", help="also count one step's FLOPs (the matmul bound)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the demo runs
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    trainer = build_trainer(args)
    with trainer.guard:
        report = {"benchmark": "demo_step", "init": args.init, "compile_decode": args.compile_decode,
                  "started": started, "machine": common.machine(), "warmup": args.warmup, "steps": args.steps,
                  "stages": time_stages(trainer, args.warmup, args.steps),
                  "fixed_work_rollout": time_rollouts(trainer, args.rollouts)}
        if args.flops:
            report["flops"] = matmul_bound(trainer)
            report["flops"]["fraction_of_bound"] = report["flops"]["bound_s"] / report["stages"]["step_s"]
    common.write_report(report, args.json, hide_suffix="_times")


if __name__ == "__main__":
    main()
