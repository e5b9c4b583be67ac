"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (DeepSpeed on CPU, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py SCENARIO ZERO OUT_DIR

Scenarios:
  update   a fixed rollout (the same one the test builds on one process) -> one Trainer.update and
           the step's metrics; rank 0 writes loss, grad_norm, metrics, every parameter's full
           gradient before the optimizer step, and the updated weights. Under ZeRO-3 the DeepSpeed
           config also spells out the batch sizes and clipping our config implies, as a user's may.
  uneven   a ZeRO-3 Trainer.rollout where one process finishes at once and the other decodes to the limit.
  images   under ZeRO-3, prompts with images on one process and without on the other are refused
           on both (the vision tower's collective forward would hang).
  sft      one SFT step on PROMPTS rows (ragged targets, one row per micro-batch); rank 0 writes
           loss, grad_norm, token count, every parameter's gradient and the updated weights.
  stats    reward-side statistics (a judge's counters) merged over processes: counts summed,
           other numbers averaged over the processes that report them.
  lora     `update` (grpo loss) with a LoRA adapter (dropout off): the adapter's gradients and updated
           weights, the reference log-probs (adapters off); then a checkpoint, whose adapter rank 0
           reads back into lora_checkpoint.pt.
  resume   a 3-step GRPO run saving every step, then a run resumed from checkpoint-1; rank 0 writes
           both runs' metrics. Also SFT: 3 steps, checkpoint, resume.
  lora_resume  `resume` with a LoRA adapter, into lora_full/, lora_resumed/, lora_sft_full/, lora_sft_resumed/.
  preempt  a 4-step GRPO run (full/), then the same run (stopped/) whose LAST process alone sends
           itself SIGTERM while scoring step 2: every process writes preempted_<rank>.json (exit
           code, step, checkpoint) and exits with Preempted's status.
  resume_preempted  stopped/ resumed from "latest" to step 4.
  nonfinite  a 3-step GRPO run whose process 0 alone gets a NaN loss in step 2: every process
           records whether its weights, optimizer state and LR moved in each step.
  variants dynamic sampling: 2 steps on rows of which every third has constant rewards; rank 0
           writes each step's trained rows (all processes, in order) and counters. The 80/20 rule:
           the fixed rollout's high-entropy token mask (top 20% over all processes) and one update.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import make_toy_dataset, sft_target, to_prompt_rows  # noqa: E402
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer  # noqa: E402
from grpo.distributed import (  # noqa: E402
    all_gather_objects, check_images_on_every_rank, init_distributed, is_main_process, world,
)
from grpo.tiny import build_tiny_model_and_processor  # noqa: E402
from grpo.resilience import Preempted  # noqa: E402
from grpo.trainer import Rollout, reward_stats  # noqa: E402

PROMPTS = 4  # over all processes
GROUP = 2
LENGTH = 6
MICRO = 2  # completions per micro-batch


def tiny():
    rows = to_prompt_rows(make_toy_dataset(16, seed=0, image_size=56), source="toy")
    corpus = [row["question"] + " " + " ".join(row["options"]) + " " + row["explanation"] for row in rows]
    # TINY_FAMILY: the model family to run (tests/test_distributed.py runs one other than the default).
    model, processor = build_tiny_model_and_processor(corpus=corpus, seed=0, min_pixels=56 * 56, max_pixels=56 * 56,
                                                      family=os.environ.get("TINY_FAMILY", "qwen2_5_vl"))
    return model, processor, rows


def fixed_rollout(family, rows, vocab_size: int, first: int, count: int):
    """Prompts rows[first:first+count], seeded random completions with ragged lengths, seeded rewards.

    Built from the global position of each completion, so any split over processes gives the same data.
    """
    from grpo.prompts import encode_prompts

    total = PROMPTS * GROUP
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(20, vocab_size, (total, LENGTH), generator=gen)
    lengths = torch.randint(1, LENGTH + 1, (total,), generator=gen)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    rewards = torch.rand(total, generator=gen)
    local = slice(first * GROUP, (first + count) * GROUP)
    prompts = encode_prompts(family, rows[first : first + count], list(range(first, first + count)), 4096)
    batch = Rollout(rows[first : first + count], prompts, ids[local], mask[local], lengths[local] == LENGTH)
    return batch, rewards[local]


def deepspeed_setting(zero: str | None, explicit_batch: bool = False):
    """zero3 with a persistence threshold of 0, so even the tiny model's parameters are really sharded
    (and every forward gathers them collectively, which is what makes uneven decoding hang).

    `explicit_batch`: also write out the GRPO update's batch sizes and clipping, the values our config
    implies; the policy's config and the reference's (which never steps) must both accept them.
    """
    if zero != "zero3":
        return zero
    setting = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if explicit_batch:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        setting.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=PROMPTS // size * GROUP // MICRO,
                       train_batch_size=PROMPTS * GROUP, gradient_clipping=GRPOConfig.max_grad_norm)
    return setting


def config(out_dir, zero, **overrides):
    settings = dict(output_dir=out_dir, group_size=GROUP, prompts_per_step=PROMPTS, completions_per_micro_batch=MICRO,
                    max_completion_length=LENGTH, learning_rate=1e-2, max_steps=1, save_steps=0, seed=0, beta=0.04,
                    deepspeed=deepspeed_setting(zero), log_completions=0)
    settings.update(overrides)
    return GRPOConfig(**settings)


def full_state(trainer) -> dict:
    """The policy's full weights (gathered under ZeRO-3) on rank 0."""
    if trainer.opt.engine is not None and trainer.opt.zero_stage == 3:
        return trainer.opt.engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def full_gradients(opt) -> dict:
    """Each trainable parameter's whole gradient as the optimizer will see it (averaged over processes,
    before clipping). Under DeepSpeed the gradient is partitioned and `safe_get_full_grad` gathers it:
    collective, valid between the last backward and the step."""
    if opt.engine is None:
        return {name: p.grad.detach().clone() for name, p in opt.model.named_parameters() if p.requires_grad}
    from deepspeed.utils import safe_get_full_grad

    return {name: safe_get_full_grad(p).detach().float().cpu().clone()
            for name, p in opt.model.named_parameters() if p.requires_grad}


def record_gradients_before_step(opt) -> dict:
    """A dict that `opt.step()` fills with `full_gradients` just before it updates the weights."""
    gradients, step = {}, opt.step

    def step_after_recording():
        gradients.update(full_gradients(opt))
        return step()

    opt.step = step_after_recording
    return gradients


def run_update(zero, out_dir, loss_type, scale_rewards, **overrides):
    """One update from the fixed rollout; returns (stats, metrics, gradients, weights, trainer, reference log-probs)."""
    model, processor, rows = tiny()
    trainer = Trainer(model, processor, [lambda prompts, completions, **c: [0.0] * len(completions)], rows,
                      config(out_dir, zero, loss_type=loss_type, scale_rewards=scale_rewards,
                             deepspeed=deepspeed_setting(zero, explicit_batch=True), **overrides))
    gradients = record_gradients_before_step(trainer.opt)
    rank, size = world()  # the trainer joined the process group
    per_rank = PROMPTS // size
    batch, rewards = fixed_rollout(trainer.family, rows, len(processor.tokenizer), rank * per_rank, per_rank)
    batch.prompts = batch.prompts.to(trainer.device)
    batch.ref_logprobs = trainer.reference_logprobs(batch)
    advantages = trainer.advantages(rewards)
    stats = trainer.update(batch, advantages)
    trainer.step = 1
    metrics = trainer._metrics(batch, rewards, rewards[None], stats, step_time=1.0)
    return stats, metrics, gradients, full_state(trainer), trainer, batch.ref_logprobs


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def signal_in_step(step: int):
    """A reward (named like length_reward, so the metrics keys match) that makes the last process
    send itself SIGTERM while the given step is being scored."""
    calls = []

    def length_reward(prompts, completions, **columns):
        calls.append(1)
        rank, size = world()
        if len(calls) == step and rank == size - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return [float(len(c)) for c in completions]

    return length_reward


def snapshot(trainer) -> dict:
    """This process's weights, optimizer state (its partition under ZeRO) and learning rate."""
    optimizer = trainer.opt.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the torch AdamW
    return {"weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "adam": copy.deepcopy([{k: v for k, v in s.items()} for s in inner.state.values()]), "lr": trainer.opt.lr}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
def spread_unless_constant(prompts, completions, constant, **columns):
    """0.5 for a `constant` row's completions, else 0, 1 by position: which groups have a reward spread
    depends on the rows only, not on what each process happened to sample."""
    return [0.5 if c else float(i % 2) for i, c in enumerate(constant)]


def dynamic_sampling_run(zero, out_dir) -> dict:
    model, processor, rows = tiny()
    rows = [{**row, "constant": index % 3 != 1} for index, row in enumerate(rows)]
    trainer = Trainer(model, processor, [spread_unless_constant], rows,
                      config(os.path.join(out_dir, "dynamic"), zero, dynamic_sampling=True, max_sampling_rounds=4,
                             max_steps=2, beta=0.0))
    trained, update = [], trainer.update

    def recording_update(batch, advantages):
        trained.append([row_id for part in all_gather_objects([row["id"] for row in batch.rows]) for row_id in part])
        return update(batch, advantages)

    trainer.update = recording_update
    history = trainer.train()
    return {"trained": trained,
            "counters": [{k: v for k, v in record.items() if k.startswith("dynamic_sampling/")} for record in history]}


def entropy_mask_update(zero, out_dir) -> dict:
    model, processor, rows = tiny()
    trainer = Trainer(model, processor, [lambda prompts, completions, **c: [0.0] * len(completions)], rows,
                      config(os.path.join(out_dir, "entropy"), zero, top_entropy_fraction=0.2))
    rank, size = world()
    per_rank = PROMPTS // size
    batch, rewards = fixed_rollout(trainer.family, rows, len(processor.tokenizer), rank * per_rank, per_rank)
    batch.prompts = batch.prompts.to(trainer.device)
    trainer.logprob_passes(batch)
    token_mask = [row for part in all_gather_objects(batch.token_mask.tolist()) for row in part]
    stats = trainer.update(batch, trainer.advantages(rewards))
    return {"token_mask": token_mask, "stats": stats}


def main():
    scenarios, zero, out_dir = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    zero = None if zero == "none" else zero
    torch.set_num_threads(1)
    for scenario in scenarios:
        run_scenario(scenario, zero, out_dir)


def run_scenario(scenario, zero, out_dir):
    results = {}
    if scenario == "update":
        for loss_type, scale in (("grpo", "group"), ("dapo", "batch")):
            stats, metrics, gradients, weights, *_ = run_update(zero, out_dir, loss_type, scale)
            if is_main_process():
                torch.save(gradients, os.path.join(out_dir, f"gradients_{loss_type}.pt"))
                torch.save(weights, os.path.join(out_dir, f"weights_{loss_type}.pt"))
            results[loss_type] = {"stats": stats, "metrics": metrics}
    elif scenario == "lora":
        stats, metrics, gradients, weights, trainer, ref_logprobs = run_update(zero, out_dir, "grpo", "group",
                                                                              lora={"dropout": 0.0})
        weights = {name: value for name, value in (weights or {}).items() if "lora_" in name}  # rank 0 has them
        checkpoint = trainer.save(1)
        ref_logprobs = all_gather_objects(ref_logprobs.tolist())
        if is_main_process():
            from safetensors.torch import load_file

            torch.save(gradients, os.path.join(out_dir, "gradients_lora.pt"))
            torch.save(weights, os.path.join(out_dir, "weights_lora.pt"))
            torch.save(load_file(os.path.join(checkpoint, "adapter_model.safetensors")),
                       os.path.join(out_dir, "lora_checkpoint.pt"))
        results = {"stats": stats, "metrics": metrics, "ref_logprobs": sum(ref_logprobs, [])}
    elif scenario == "uneven":
        model, processor, rows = tiny()
        trainer = Trainer(model, processor, [lambda prompts, completions, **c: [0.0] * len(completions)], rows,
                          config(out_dir, zero, max_completion_length=12))
        rank, _ = world()
        # Rank 0 treats every token as end-of-sequence (done after one step); rank 1 decodes all 12.
        # Through the trainer's own rollout: cached image features, synced decoding, reference log-probs.
        if rank == 0:
            trainer.family.eos_ids = list(range(len(processor.tokenizer)))
        else:  # never samples an end, whatever the random stream
            trainer.family.forbidden_ids = trainer.family.forbidden_ids + trainer.family.eos_ids
        batch = trainer.rollout(rows[rank : rank + 1], [rank], torch.Generator().manual_seed(rank))
        trainer.logprob_passes(batch)
        results = {"rank": rank, "lengths": batch.completion_mask.sum(1).tolist(),
                   "ref_logprobs_finite": bool(batch.ref_logprobs.isfinite().all())}
        gathered = [None] * world()[1]
        torch.distributed.all_gather_object(gathered, results)
        results = {"per_rank": gathered}
    elif scenario == "images":
        init_distributed(use_deepspeed=False)  # no trainer here to join the process group
        rank, _ = world()
        rows = [2 * rank, 2 * rank + 1]
        check_images_on_every_rank([1, 2], rows, torch.device("cpu"))  # every prompt has images: accepted
        try:
            check_images_on_every_rank([1, 1] if rank == 0 else [0, 0], rows, torch.device("cpu"))
            message = None
        except ValueError as error:
            message = str(error)
        results = {"per_rank": all_gather_objects(message)}
    elif scenario == "sft":
        model, processor, rows = tiny()
        for row in rows:
            row["completion"] = sft_target(row)  # 48 to 61 tokens, two cut at 58: the token mean must span processes
        trainer = SFTTrainer(model, processor, rows, SFTConfig(
            output_dir=os.path.join(out_dir, "sft"), batch_size=PROMPTS, micro_batch_size=1, max_steps=1,
            learning_rate=1e-2, max_completion_length=58, freeze_vision_tower=False, deepspeed=deepspeed_setting(zero)))
        gradients = record_gradients_before_step(trainer.opt)
        (record,) = trainer.train()
        results = {"loss": record["loss"], "grad_norm": record["grad_norm"], "tokens": record["tokens"],
                   "truncated_frac": record["truncated_frac"]}
        weights = full_state(trainer)
        if is_main_process():
            torch.save(gradients, os.path.join(out_dir, "gradients_sft.pt"))
            torch.save(weights, os.path.join(out_dir, "weights_sft.pt"))
    elif scenario == "stats":
        init_distributed(use_deepspeed=False)  # no trainer here to join the process group
        rank, _ = world()

        class Counter:
            __name__ = "counter"

            def stats(self):  # different on each process: counts add up, other numbers average
                return {"requests": rank + 1, "latency_p50": 0.1 * (rank + 1), "integrity_mean": None if rank else 0.5}

        results = reward_stats([Counter()])
    elif scenario in ("resume", "lora_resume"):
        # lora_resume: the same with a LoRA adapter (dropout off), whose checkpoints hold the adapter only.
        lora = {"dropout": 0.0} if scenario == "lora_resume" else None
        prefix = "lora_" if lora else ""
        model, processor, rows = tiny()

        def reward(prompts, completions, **columns):
            return [float(len(c)) for c in completions]

        full_dir, resumed_dir = os.path.join(out_dir, prefix + "full"), os.path.join(out_dir, prefix + "resumed")
        Trainer(model, processor, [reward], rows, config(full_dir, zero, max_steps=3, save_steps=1, lora=lora)).train()
        model, processor, rows = tiny()
        # The resumed run starts from the full run's checkpoint-1, as after a crash during step 2.
        if is_main_process():
            import shutil

            shutil.copytree(os.path.join(full_dir, "checkpoint-1"), os.path.join(resumed_dir, "checkpoint-1"))
        torch.distributed.barrier()
        Trainer(model, processor, [reward], rows,
                config(resumed_dir, zero, max_steps=3, save_steps=1, resume_from_checkpoint="latest", lora=lora)).train()
        for row in rows:
            row["completion"] = sft_target(row)
        sft_dirs = [os.path.join(out_dir, prefix + "sft_full"), os.path.join(out_dir, prefix + "sft_resumed")]
        sft_settings = dict(batch_size=4, micro_batch_size=1, learning_rate=1e-2, max_steps=3, save_steps=1,
                            deepspeed=deepspeed_setting(zero), max_completion_length=16, lora=lora)
        model, processor, rows_ = tiny()
        SFTTrainer(model, processor, rows, SFTConfig(output_dir=sft_dirs[0], **sft_settings)).train()
        if is_main_process():
            import shutil

            shutil.copytree(os.path.join(sft_dirs[0], "checkpoint-1"), os.path.join(sft_dirs[1], "checkpoint-1"))
        torch.distributed.barrier()
        model, processor, rows_ = tiny()
        SFTTrainer(model, processor, rows, SFTConfig(output_dir=sft_dirs[1], resume_from_checkpoint="latest",
                                                     **sft_settings)).train()
    elif scenario == "preempt":
        model, processor, rows = tiny()
        Trainer(model, processor, [length_reward], rows, config(os.path.join(out_dir, "full"), zero, max_steps=4)).train()
        model, processor, rows = tiny()
        trainer = Trainer(model, processor, [signal_in_step(2)], rows, config(os.path.join(out_dir, "stopped"), zero, max_steps=4))
        try:
            trainer.train()
        except Preempted as stop:
            with open(os.path.join(out_dir, f"preempted_{world()[0]}.json"), "w") as f:
                json.dump({"code": stop.code, "step": stop.step, "checkpoint": stop.checkpoint, "signal": stop.signal_name}, f)
            raise
    elif scenario == "resume_preempted":
        model, processor, rows = tiny()
        Trainer(model, processor, [length_reward], rows, config(os.path.join(out_dir, "stopped"), zero, max_steps=4,
                                                                 resume_from_checkpoint="latest")).train()
    elif scenario == "nonfinite":
        import grpo.trainer

        model, processor, rows = tiny()
        trainer = Trainer(model, processor, [length_reward], rows, config(os.path.join(out_dir, "nonfinite"), zero, max_steps=3,
                                                                         lr_scheduler="cosine", warmup_steps=1))
        real_loss, real_update = grpo.trainer.grpo_loss, trainer.update

        def loss_nan_on_process_0_in_step_2(*args, **kwargs):
            loss, stats = real_loss(*args, **kwargs)
            return (loss * float("nan") if trainer.step == 1 and world()[0] == 0 else loss), stats

        moved = []

        def update(batch, advantages):
            before = snapshot(trainer)
            stats = real_update(batch, advantages)
            after = snapshot(trainer)
            moved.append({key: not same(before[key], after[key]) for key in before})
            return stats

        grpo.trainer.grpo_loss, trainer.update = loss_nan_on_process_0_in_step_2, update
        trainer.train()
        results = {"per_rank": all_gather_objects({"moved": moved, "skipped_updates": trainer.opt.skipped_updates})}
    elif scenario == "variants":
        results = {"dynamic": dynamic_sampling_run(zero, out_dir), "entropy": entropy_mask_update(zero, out_dir)}
    if is_main_process():
        with open(os.path.join(out_dir, f"{scenario}.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
    # Every result is on disk. Skip the interpreter's teardown: rarely, a gloo / DeepSpeed background
    # thread still alive there aborts the process ("terminate called without an active exception")
    # after the run finished, which would fail a test whose run was right.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
