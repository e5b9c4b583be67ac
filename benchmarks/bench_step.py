"""One GRPO step, ours vs TRL's GRPOTrainer, on the same model, data and settings.

    python benchmarks/bench_step.py --config paper-shape-small --against trl --json benchmarks/results/step_paper-shape-small.json
    python benchmarks/bench_step.py --config paper-shape-small --family gemma3 --with-plain --json benchmarks/results/step_paper-shape-small_gemma3.json

Both sides load one saved random-weight model directory and train on the same `prompts_per_step`
rows every step (the dataset is exactly those rows), with G=4, beta=0.04, loss_type grpo,
num_iterations 1, temperature 1, the vision tower frozen, no gradient checkpointing (unless
`--gradient-checkpointing`, for every side), one forward
per step over all completions, and EOS (and the vision tokens) suppressed in sampling so every
completion runs to max_completion_length on both sides. Each side runs in its own subprocess (so
peak RSS is its own); the subprocesses alternate, `--rounds` times, and each times `--steps` steps
after `--warmup` untimed ones. A step is rollout + rewards + backward + optimizer step.

`--family` picks the model family (common.FAMILY_SHAPES; Qwen2.5-VL by default). Where TRL fails on a
family, the report keeps our sides and records TRL's error instead of its time.

Memory, per side, up to the end of the last step (our run's final checkpoint is left out): the peak
RSS (VmHWM, interpreter and libraries included); the peak above the baseline, the RSS read right
before the model is loaded (every import done); and, from one more untimed run per side in which
glibc returns freed memory to the system (common.RETURN_FREED_MEMORY), that run's peak above its
baseline ("live": weights, reference, optimizer state and the step's live tensors, the CPU analogue
of torch.cuda.max_memory_allocated) and its RSS above the baseline after the last step ("state":
what stays between steps). Under glibc's default the peak also counts freed memory the allocator
keeps (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIDES = ("ours", "trl", "ours-plain", "ours-lora")
LORA = {"r": 16, "alpha": 32}  # --lora: our step with a rank-16 adapter on the language model (docs/lora.md)


def length_reward(prompts, completions, **columns):
    """A cheap reward both trainers can call (TRL passes conversational completions as messages)."""
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def memory(baseline: float) -> dict:
    """The process's memory so far (MiB): its peak RSS, and its peak and present RSS above `baseline`."""
    peak, now = common.peak_rss_mib(), common.rss_mib()
    return {"peak_rss_mib": peak, "baseline_rss_mib": baseline, "peak_above_baseline_mib": peak - baseline,
            "end_above_baseline_mib": now - baseline}


def run_ours(args, shape, rows, shared_prefix: bool, lora=None) -> tuple[list[float], dict]:
    """Step times after the warmup, and `memory` after the last step, before the run's final checkpoint."""
    from grpo import GRPOConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, group_size=shape["group_size"], prompts_per_step=shape["prompts_per_step"],
            completions_per_micro_batch=shape["prompts_per_step"] * shape["group_size"], max_prompt_length=4096,
            max_completion_length=shape["max_completion_length"], beta=0.04, loss_type="grpo", num_iterations=1,
            temperature=1.0, learning_rate=1e-6, max_steps=args.warmup + args.steps, save_steps=0, log_completions=0,
            freeze_vision_tower=True, dtype="float32", shared_prefix=shared_prefix, seed=0, lora=lora,
            gradient_checkpointing=args.gradient_checkpointing, compile_decode=args.compile_decode == "on",
        )
        baseline = common.rss_mib()
        trainer = Trainer(args.model_dir, args.model_dir, [length_reward], rows, cfg)
        family = trainer.family
        family.forbidden_ids = sorted(set(family.forbidden_ids) | set(family.eos_ids))  # completions run to the limit
        measured = {}

        def save(step, checkpoint=trainer.save):
            # The final checkpoint is no step (TRL's side saves none); transformers' first save_pretrained
            # also imports ~130 MiB of modules here (mlflow, deepspeed, pandas), which PEFT's adapter save does not.
            measured.update(memory(baseline))
            return checkpoint(step)

        trainer.save = save
        history = trainer.train()
    assert all(h["completion_length/min"] == shape["max_completion_length"] for h in history)
    return [h["step_time"] for h in history[args.warmup:]], measured


def run_trl(args, shape, rows) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.models import family_for

    processor = AutoProcessor.from_pretrained(args.model_dir)
    baseline = common.rss_mib()  # the model classes are imported already (grpo.models)
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=torch.float32)
    family = family_for(model, processor)
    for module in family.vision_modules(model):  # frozen like ours (the paper trains the language model only)
        module.requires_grad_(False)
    completions = shape["prompts_per_step"] * shape["group_size"]
    times, marks = [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - marks["start"])

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, num_generations=shape["group_size"], per_device_train_batch_size=completions,
            gradient_accumulation_steps=1, max_completion_length=shape["max_completion_length"], beta=0.04,
            loss_type="grpo", num_iterations=1, temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-6,
            max_steps=args.warmup + args.steps, gradient_checkpointing=args.gradient_checkpointing, use_cpu=True, bf16=False,
            report_to="none", save_strategy="no", logging_steps=1, shuffle_dataset=False,
            dataloader_num_workers=0, seed=0, log_completions=False,
            generation_kwargs={"suppress_tokens": family.forbidden_ids + family.eos_ids},
        )
        dataset = Dataset.from_list([{"prompt": row["prompt"], "image": row["image"]} for row in rows])
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=cfg, train_dataset=dataset,
                              processing_class=processor, callbacks=[StepTimer()])
        trainer.train()
    lengths = [log["completions/min_length"] for log in trainer.state.log_history if "completions/min_length" in log]
    assert lengths and all(n == shape["max_completion_length"] for n in lengths), lengths
    return times[args.warmup:], memory(baseline)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    shape = common.CONFIGS[args.config]
    rows = common.rows_for(args.config, shape["prompts_per_step"], args.family)  # every step: these prompts
    if args.worker == "trl":
        times, measured = run_trl(args, shape, rows)
    else:
        times, measured = run_ours(args, shape, rows, shared_prefix=args.worker != "ours-plain",
                                   lora=LORA if args.worker == "ours-lora" else None)
    print("RESULT " + json.dumps({"side": args.worker, "step_s": times, **measured}))


def spawn(args, side: str, model_dir: str, return_freed: bool = False) -> dict:
    """One worker subprocess of `side`; `return_freed`: glibc returning freed memory (the live-memory run)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", side, "--config", args.config, "--family", args.family,
               "--model-dir", model_dir, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--compile-decode", args.compile_decode] + (
                   ["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(common.RETURN_FREED_MEMORY if return_freed else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{side} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    label = f"{side} (live)" if return_freed else side
    print(f"  {label:17s} steps {[round(t, 3) for t in result['step_s']]}  peak RSS {result['peak_rss_mib']:.0f} MiB, "
          f"{result['peak_above_baseline_mib']:.0f} above the baseline {result['baseline_rss_mib']:.0f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(common.CONFIGS), default="tiny")
    parser.add_argument("--family", choices=common.FAMILIES, default=common.DEFAULT_FAMILY,
                        help="model family (paper-shape-small: common.FAMILY_SHAPES)")
    parser.add_argument("--against", choices=["trl"], default="trl")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the sides (one subprocess each)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per subprocess")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every side")
    parser.add_argument("--with-plain", action="store_true", help="also time our plain path (shared_prefix=False)")
    parser.add_argument("--compile-decode", choices=["on", "off"], default="off",
                        help="our sides decode through grpo.decoding.StaticDecoder (compiled); the warmup steps compile")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="every side recomputes activations in backward")
    parser.add_argument("--lora", action="store_true", help="ours with a rank-16 LoRA adapter against ours fully fine-tuned, instead of TRL")
    parser.add_argument("--live-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="one more untimed run per side with glibc returning freed memory: the live peak")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sides = ["ours", "ours-lora" if args.lora else args.against] + (["ours-plain"] if args.with_plain else [])
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    machine = common.machine()  # before the runs: its load average is the one the runs started under
    results = {side: [] for side in sides}
    live = {}  # side -> its live-memory run
    errors = {}  # side -> the end of its worker's error; it is not run again
    with tempfile.TemporaryDirectory() as model_dir:
        model_info = common.save(args.config, model_dir, args.family)
        print(f"{args.config} {args.family}: {model_info}", flush=True)
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            order = sides if round_index % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                if side in errors:
                    continue
                try:
                    results[side].append(spawn(args, side, model_dir))
                except RuntimeError as error:
                    if side != args.against:
                        raise
                    errors[side] = str(error)[-2000:]
                    print(f"  {side} failed: {str(error)[-600:]}", flush=True)
        if args.live_memory:
            print("live memory (glibc returning freed memory; untimed)", flush=True)
            for side in sides:
                if side not in errors:
                    live[side] = spawn(args, side, model_dir, return_freed=True)

    def summary(side):
        runs = results[side]
        steps = [t for run in runs for t in run["step_s"]]
        found = {"step_s": steps, "step_s_median": statistics.median(steps),
                 "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
                 "baseline_rss_mib": statistics.median(run["baseline_rss_mib"] for run in runs),
                 "peak_above_baseline_mib": max(run["peak_above_baseline_mib"] for run in runs)}
        if side in live:
            found.update({"live_peak_mib": live[side]["peak_above_baseline_mib"],
                          "live_state_mib": live[side]["end_above_baseline_mib"], "live_run_step_s": live[side]["step_s"]})
        return found

    def flat(prefix, found):  # the summary's memory entries under the side's prefix (step times are named per mode)
        return {f"{prefix}_{key}": value for key, value in found.items() if not key.startswith("step_s")}

    report = {
        "benchmark": "grpo_step", "config": args.config, "family": args.family, "shape": common.CONFIGS[args.config],
        # for a family other than Qwen2.5-VL, what differs from `shape` (vision tower, image size, layer types)
        "family_shape": common.FAMILY_SHAPES.get(args.family) if args.config == "paper-shape-small" else None,
        "model": model_info,
        "settings": {"beta": 0.04, "loss_type": "grpo", "num_iterations": 1, "temperature": 1.0,
                     "freeze_vision_tower": True, "gradient_checkpointing": args.gradient_checkpointing, "eos_suppressed": True,
                     "compile_decode": args.compile_decode,
                     "rounds": args.rounds, "timed_steps_per_round": args.steps, "warmup_steps_per_round": args.warmup,
                     "threads": args.threads},
        "started": started, "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "memory_keys": {
            "peak_rss_mib": "VmHWM of the side's process, interpreter and libraries included (max over rounds)",
            "baseline_rss_mib": "RSS right before the model is loaded, every import done (median over rounds)",
            "peak_above_baseline_mib": "peak RSS - baseline, glibc's default allocator (max over rounds)",
            "live_peak_mib": "peak RSS - baseline in one more run with glibc returning freed memory: the live peak",
            "live_state_mib": "RSS - baseline after the last step in that run: what stays between steps",
        },
    }
    if args.lora:
        full, lora = summary("ours"), summary("ours-lora")
        report.update({"lora": LORA, "full_step_s_median": full["step_s_median"], "lora_step_s_median": lora["step_s_median"],
                       **flat("full", full), **flat("lora", lora),
                       "lora_memory_fraction": {key: lora[key] / full[key] for key in
                                                ("peak_rss_mib", "peak_above_baseline_mib", "live_peak_mib") if key in full},
                       "lora_speedup": full["step_s_median"] / lora["step_s_median"],
                       "full_step_s": full["step_s"], "lora_step_s": lora["step_s"]})
        return common.write_report(report, args.json, hide_suffix="_step_s")
    ours = summary("ours")
    report.update({"ours_step_s_median": ours["step_s_median"], **flat("ours", ours), "ours_step_s": ours["step_s"]})
    if args.against in errors:
        report[f"{args.against}_error"] = errors[args.against]
    else:
        theirs = summary(args.against)
        report.update({
            f"{args.against}_step_s_median": theirs["step_s_median"], "speedup": theirs["step_s_median"] / ours["step_s_median"],
            **flat(args.against, theirs), f"{args.against}_step_s": theirs["step_s"],
        })
    if args.with_plain:
        plain = summary("ours-plain")
        report.update({"ours_plain_step_s_median": plain["step_s_median"], **flat("ours_plain", plain),
                       "ours_plain_step_s": plain["step_s"], "shared_prefix_speedup": plain["step_s_median"] / ours["step_s_median"]})
    common.write_report(report, args.json, hide_suffix="_step_s")


if __name__ == "__main__":
    main()
