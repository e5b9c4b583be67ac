"""GRPO trainer: sample G completions per prompt -> score -> group advantages -> clipped update with KL.

One training step:
  1. `rollout`   take `prompts_per_step` rows, sample G completions each (grpo.rollout.generate);
                 old-policy log-probs (only when num_iterations > 1) and reference log-probs (only when
                 beta > 0) are computed here, without gradient.
  2. `score`     call every reward function (async ones concurrently); weighted sum -> rewards [B*G].
  3. advantages  grpo.objective.group_advantages, per group of G.
  4. `update`    num_iterations optimizer updates, each accumulating gradients over micro-batches of
                 `completions_per_micro_batch` completions, loss = grpo.objective.grpo_loss.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch

from . import lora
from .config import ConfigMixin
from .distributed import (
    Optimization, all_gather_cat, all_reduce_sum, check_images_on_every_rank, is_main_process, world,
)
from .objective import LOSS_TYPES, SCALE_MODES, group_advantages, grpo_loss
from .evaluate import evaluate
from .logprobs import group_logprobs, with_image_features
from .prompts import PromptBatch, column, encode_prompts
from .sampling import SamplingParams, decode_completions, generate
from .scoring import call_reward_functions, combine_rewards, reward_columns, reward_name, reward_stats
from .tracking import MetricsLog, require_trackers
from .training import (
    load_checkpoint, prepare_model, prepare_reference_model, resolve_checkpoint, rows_for_step,
    save_checkpoint, seed_everything, setup_processes, start_output_dir, vision_modules_equal, vision_trains,
)


@dataclass
class GRPOConfig(ConfigMixin):
    """GRPO hyper-parameters. Defaults are the paper's (PathVLM-R1) where it gives them."""

    output_dir: str = "runs/grpo"  # metrics.jsonl, completions.jsonl and checkpoints go here
    # rollout
    group_size: int = 4  # G: completions sampled per prompt
    prompts_per_step: int = 8  # prompts per training step; completions per step = prompts_per_step * G
    completions_per_micro_batch: int = 8  # completions per forward/backward (gradient accumulation unit)
    max_prompt_length: int = 1024  # longer prompts are an error naming the row (never cut through an image)
    max_completion_length: int = 1024  # new tokens per completion
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # objective (SPEC 2)
    beta: float = 0.04  # KL coefficient; 0 loads no reference model
    epsilon_low: float = 0.2  # lower clip: rho >= 1 - epsilon_low
    epsilon_high: float | None = None  # upper clip: rho <= 1 + epsilon_high (None = epsilon_low; DAPO 0.28)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # mu: optimizer updates per rollout batch
    mask_truncated_completions: bool = False  # drop completions without EOS from the loss (DAPO)
    dual_clip: float | None = None  # verl's dual-clip c (e.g. 3): caps a negative-advantage token's loss at -c*A
    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0  # in optimizer updates
    lr_scheduler: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0
    max_steps: int = 2000  # training steps (rollouts)
    seed: int = 0
    freeze_vision_tower: bool = True  # the paper trains the language model only
    dtype: str = "auto"  # for from_pretrained: auto | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # LoRA through PEFT (grpo/lora.py, README: LoRA): None = full fine-tuning; a dict of r, alpha, dropout,
    # target_modules, lora_vision (or a peft.LoraConfig) trains a fresh adapter, the reference being the
    # policy with its adapters off. A model that already carries an adapter continues it with lora=None.
    lora: dict | None = None
    # scale-out (grpo/distributed.py); prompts_per_step is global and split evenly over the processes
    deepspeed: str | dict | None = None  # None | "zero2" | "zero3" | path to a DeepSpeed JSON | a dict
    offload_optimizer: bool = False  # DeepSpeed: optimizer states in CPU memory
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory
    # Share each prompt across its G completions: image features computed once per step, each prompt
    # forwarded once per log-prob pass with its G completions attending to its KV cache (the plain
    # path's numbers, less work). The policy forward falls back to the plain path under
    # gradient_checkpointing (no KV cache there); with freeze_vision_tower=False it runs the vision
    # tower again, once per prompt, with gradient. False = plain path: each completion its own prompt.
    # Runs under DeepSpeed ZeRO-2/3 too (tests/test_distributed.py); benchmarks/README.md has the speed-up.
    # A model of no known family runs the plain path whatever this says (README: Model families).
    shared_prefix: bool = True
    # logging and checkpoints
    log_completions: int = 4  # completions per step written to completions.jsonl (0 = none)
    eval_steps: int = 0  # evaluate on eval_dataset every N steps (0 = off)
    eval_batch_size: int = 32
    save_steps: int = 500  # 0 = only at the end
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    overwrite_output_dir: bool = False  # a fresh run may replace the results of an earlier run in output_dir
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard | wandb | mlflow

    def __post_init__(self):
        self.report_to = require_trackers(self.report_to)
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2 (got {self.group_size}): advantages compare within a group")
        completions = self.prompts_per_step * self.group_size
        if self.completions_per_micro_batch < 1 or completions % self.completions_per_micro_batch:
            raise ValueError(
                f"completions_per_micro_batch={self.completions_per_micro_batch} must divide the completions per "
                f"step = prompts_per_step {self.prompts_per_step} x group_size {self.group_size} = {completions}"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_MODES:
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}; valid: {', '.join(SCALE_MODES)}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (verl uses 3) or None, got {self.dual_clip}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}: GRPO samples its G completions "
                             f"(greedy ones would be identical) and divides logits by it")
        self.sampling_params()  # checks top_p, top_k and max_completion_length
        lora.check_settings(self.lora, "GRPOConfig")

    def sampling_params(self) -> SamplingParams:
        """How the rollout draws its completions."""
        return SamplingParams(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


# The progress line: label -> metrics key (the eval accuracy shows its last value between evaluations).
PROGRESS_SHOWN = {"reward": "reward", "kl": "kl", "eval acc": "eval/accuracy"}


@dataclass
class Rollout:
    """Everything one step carries from sampling to the update (prompt-major, completion i -> prompt i // G)."""

    rows: list[dict]
    prompts: PromptBatch  # B prompts
    completion_ids: torch.Tensor  # [B*G, C]
    completion_mask: torch.Tensor  # [B*G, C]
    truncated: torch.Tensor  # [B*G]
    texts: list[str] = field(default_factory=list)
    old_logprobs: torch.Tensor | None = None  # [B*G, C] only when num_iterations > 1
    ref_logprobs: torch.Tensor | None = None  # [B*G, C] only when beta > 0


class Trainer:
    """GRPO on a Hugging Face vision-language model.

    `train_dataset`: a list, a `datasets.Dataset` or any indexable sequence of rows; each row needs
    `prompt` (chat messages) and `image` (PIL image, path, lazy image or {bytes, path}) or `images`; every other field is passed to the reward functions
    as a column. `reward_funcs`: callables `f(prompts, completions, **columns) -> list[float | None]`
    (sync or async). `model`: a loaded model or a name/path for `from_pretrained`.
    """

    def __init__(self, model, processor, reward_funcs, train_dataset, config: GRPOConfig | None = None,
                 reward_weights=None, ref_model=None, eval_dataset=None, eval_reward_funcs=None):
        self.config = config or GRPOConfig()
        cfg = self.config
        self.device = setup_processes(cfg)
        rank, size = world()
        if cfg.prompts_per_step % size:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of processes ({size})")
        local_completions = cfg.prompts_per_step // size * cfg.group_size
        if local_completions % cfg.completions_per_micro_batch:
            raise ValueError(
                f"completions_per_micro_batch={cfg.completions_per_micro_batch} must divide the completions per process = "
                f"prompts_per_step {cfg.prompts_per_step} / {size} processes x group_size {cfg.group_size} = {local_completions}")
        seed_everything(cfg.seed + rank)
        self.model, self.processor, self.family = prepare_model(model, processor, cfg, self.device)
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not self.reward_funcs:
            raise ValueError("at least one reward function is needed")
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward functions")
        self.train_dataset = train_dataset
        if len(train_dataset) < cfg.prompts_per_step:
            raise ValueError(f"train_dataset has {len(train_dataset)} rows, fewer than prompts_per_step={cfg.prompts_per_step}")
        for index, prompt in enumerate(column(train_dataset, "prompt")):  # the prompts only: no image is opened
            if not prompt:
                raise ValueError(f"train_dataset row {index}: missing field 'prompt' (chat messages)")
        self.eval_dataset = eval_dataset
        self.eval_reward_funcs = eval_reward_funcs or self.reward_funcs
        # The reference is copied before DeepSpeed partitions the policy. Under LoRA there is none to
        # copy (ref_model stays None): the policy with its adapters switched off is the reference.
        self.ref_model = prepare_reference_model(ref_model, self.model, cfg, self.device) if cfg.beta > 0 else None
        self.vision_trains = vision_trains(self.family, self.model)
        # The reference may reuse the policy's image features only while both towers are the same and frozen.
        if self.ref_model is not None:
            self.ref_shares_vision = not self.vision_trains and vision_modules_equal(
                self.family.vision_modules(self.model), self.family.vision_modules(self.ref_model))
        else:
            self.ref_shares_vision = cfg.beta > 0 and not lora.adapts(self.family.vision_modules(self.model))
        self.opt = Optimization(self.model, cfg, total_updates=cfg.max_steps * cfg.num_iterations,
                                micro_batches_per_update=local_completions // cfg.completions_per_micro_batch,
                                micro_batch_size=cfg.completions_per_micro_batch)
        self.step = 0

    @property
    def policy(self):
        """What forwards run on: the DeepSpeed engine when there is one, else the model."""
        return self.opt.module

    # ------------------------------------------------------------------ data
    def _rows_for_step(self, step: int) -> tuple[list[dict], list[int]]:
        return rows_for_step(self.train_dataset, step, self.config.prompts_per_step, self.config.seed, "prompts_per_step")

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def rollout(self, rows: list[dict], row_indices: list[int], generator: torch.Generator) -> Rollout:
        cfg = self.config
        prompts = encode_prompts(self.family, rows, row_indices, cfg.max_prompt_length).to(self.device)
        if self.opt.zero_stage == 3:  # a process without images would skip the tower's collective forward
            check_images_on_every_rank(prompts.images_per_prompt, row_indices, self.device)
        self.opt.train(False)
        if cfg.shared_prefix:
            prompts = with_image_features(self.family, self.model, prompts)  # vision once, for the rollout and every pass
        out = generate(self.family, self.policy, prompts, cfg.sampling_params(), group_size=cfg.group_size,
                       generator=generator, synced=self.opt.zero_stage == 3)
        batch = Rollout(rows, prompts, out.ids, out.mask, out.truncated)
        batch.texts = decode_completions(self.family, out)
        if cfg.num_iterations > 1:
            batch.old_logprobs = self._logprobs_all(self.policy, batch, batch.prompts)
        if cfg.beta > 0:
            batch.ref_logprobs = self.reference_logprobs(batch)
        return batch

    @torch.no_grad()
    def reference_logprobs(self, batch: Rollout) -> torch.Tensor:
        """Log-probs [B*G, C] under the frozen reference: the reference model, or under LoRA the policy
        switched to the reference (adapters off, or the continued adapter's frozen starting copy)."""
        if self.ref_model is not None:
            model, mode = self.ref_model, contextlib.nullcontext()
        else:
            model, mode = self.policy, lora.reference_mode(self.model)
        with mode:
            prompts = batch.prompts
            if self.config.shared_prefix and not self.ref_shares_vision:
                prompts = with_image_features(self.family, model, batch.prompts)
            return self._logprobs_all(model, batch, prompts)

    def _micro_batches(self, batch: Rollout, prompts: PromptBatch):
        """(completion indices, their distinct prompts, each completion's prompt among those) per micro-batch."""
        size, G = self.config.completions_per_micro_batch, self.config.group_size
        for start in range(0, batch.completion_ids.shape[0], size):
            index = list(range(start, start + size))
            groups = sorted({i // G for i in index})
            yield index, prompts.select(groups), [groups.index(i // G) for i in index]

    def _logprobs(self, model, batch: Rollout, index, prompts, prompt_index) -> torch.Tensor:
        return group_logprobs(self.family, model, prompts, prompt_index, batch.completion_ids[index],
                              batch.completion_mask[index], self.config.temperature, shared_prefix=self.config.shared_prefix)

    def _logprobs_all(self, model, batch: Rollout, prompts: PromptBatch | None = None) -> torch.Tensor:
        """Log-probs of every completion under `model` (`prompts`: batch.prompts by default)."""
        parts = self._micro_batches(batch, batch.prompts if prompts is None else prompts)
        return torch.cat([self._logprobs(model, batch, *part) for part in parts])

    def score(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [B*G] (weighted sum) and the per-function matrix [F, B*G] (NaN where None)."""
        G = self.config.group_size
        rows = [row for row in batch.rows for _ in range(G)]
        results = call_reward_functions(self.reward_funcs, [row["prompt"] for row in rows], batch.texts, reward_columns(rows))
        return combine_rewards(results, self.reward_weights)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group-normalised advantages [B*G] of this process's completions.

        Computed over every process's rewards, so scale_rewards="batch" divides by the std of the
        whole step's batch, exactly as on one process; groups never span processes.
        """
        everything = all_gather_cat(rewards.to(self.device))  # [world*B*G]
        advantages = group_advantages(everything, self.config.group_size, scale=self.config.scale_rewards)
        rank, _ = world()
        return advantages[rank * len(rewards) : (rank + 1) * len(rewards)].cpu()

    def update(self, batch: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """num_iterations optimizer updates over the rollout; returns loss/kl/clip_ratio/dual_clip_ratio/grad_norm.

        Micro-batch losses are weighted by their share of the process's completions, and DeepSpeed
        averages the processes: grpo and dr_grpo then equal one loss over the whole step's batch on
        a single process. bnpo's token mean is taken per micro-batch (as in TRL), so with several
        micro-batches it is the mean of their token means. dapo divides by the step's token count over
        all processes (the same whatever the micro-batching) and is scaled by the world size to undo
        DeepSpeed's averaging.
        """
        cfg = self.config
        _, size = world()
        self.opt.train(True)
        mask = batch.completion_mask.clone()
        if cfg.mask_truncated_completions:
            mask[batch.truncated] = 0
        n = mask.shape[0]
        step_tokens = all_reduce_sum(mask.sum().to(self.device).float()).clamp(min=1).cpu()  # dapo's num_items_in_batch
        advantages = advantages.to(self.device)
        averaged = ("kl", "clip_ratio", "dual_clip_ratio")  # grpo_loss's stats, averaged like the loss
        totals = {"loss": 0.0, "grad_norm": 0.0, **dict.fromkeys(averaged, 0.0)}
        # Cached image features carry no gradient: a trainable vision tower must see the pixels again.
        prompts = batch.prompts.without_features() if self.vision_trains else batch.prompts
        for _ in range(cfg.num_iterations):
            for index, micro_prompts, prompt_index in self._micro_batches(batch, prompts):
                logprobs = self._logprobs(self.policy, batch, index, micro_prompts, prompt_index)  # [b, C]
                old = batch.old_logprobs[index] if batch.old_logprobs is not None else logprobs.detach()
                ref = batch.ref_logprobs[index] if batch.ref_logprobs is not None else None
                loss, stats = grpo_loss(
                    logprobs, old, advantages[index], mask[index].to(self.device), ref_logprobs=ref, beta=cfg.beta,
                    epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_completion_length, num_items_in_batch=step_tokens.to(self.device),
                    dual_clip=cfg.dual_clip,
                )
                weight = size if cfg.loss_type == "dapo" else len(index) / n
                self.opt.backward(loss * weight)
                totals["loss"] += loss.item() * (1.0 if cfg.loss_type == "dapo" else len(index) / n) / cfg.num_iterations
                for key in averaged:
                    totals[key] += float(stats[key]) * len(index) / n / cfg.num_iterations
            totals["grad_norm"] += self.opt.step() / cfg.num_iterations
        # The step's loss and stats: dapo's per-process losses add up, everything else averages.
        reduced = all_reduce_sum(torch.tensor([totals["loss"], *(totals[k] for k in averaged)], device=self.device)).tolist()
        totals["loss"] = reduced[0] if cfg.loss_type == "dapo" else reduced[0] / size
        totals.update({key: value / size for key, value in zip(averaged, reduced[1:])})
        return totals

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        cfg = self.config
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        if resume:
            self.step = load_checkpoint(resume, self.opt)["step"]
        start_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
        main = is_main_process()
        start = self.step if resume else None
        metrics_log = MetricsLog(cfg, start, "grpo", PROGRESS_SHOWN, completions=True) if main else None
        history = []
        rank, _ = world()
        while self.step < cfg.max_steps:
            t0 = time.time()
            rows, row_indices = self._rows_for_step(self.step)
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + self.step * 1009 + rank)
            batch = self.rollout(rows, row_indices, generator)
            rewards, per_func = self.score(batch)  # [B*G], [F, B*G]
            advantages = self.advantages(rewards)
            stats = self.update(batch, advantages)
            self.step += 1
            record = self._metrics(batch, rewards, per_func, stats, time.time() - t0)
            # Reward-side counters are read before evaluation, so they count this step's training calls only.
            record.update(reward_stats(self.reward_funcs))
            if cfg.eval_steps and self.eval_dataset is not None and (self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps):
                record.update(self.evaluate())
            history.append(record)
            if main:
                metrics_log.write(record)
                self._log_samples(metrics_log, batch, rewards, per_func, advantages)
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.max_steps:
                self.save(self.step)
        if main:
            metrics_log.close()
        return history

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.policy, self.processor, self.eval_dataset, self.eval_reward_funcs,
                          batch_size=self.config.eval_batch_size, max_completion_length=self.config.max_completion_length,
                          synced=self.opt.zero_stage == 3)
        result = {k: v for k, v in result.items() if k != "records"}
        result.update(reward_stats(self.eval_reward_funcs))  # the evaluation's own judge traffic, say
        return {f"eval/{k}": v for k, v in result.items()}

    def save(self, step: int) -> str:
        return save_checkpoint(self.config.output_dir, step, self.opt, self.processor, {"config": asdict(self.config)},
                               self.config.save_total_limit)

    # ------------------------------------------------------------------ logging
    def _metrics(self, batch: Rollout, rewards, per_func, stats, step_time) -> dict:
        """One metrics.jsonl record for the whole step: per-completion values are gathered from every
        process first, so the numbers do not depend on how many processes ran the step."""
        G = self.config.group_size
        per_completion = torch.cat([
            rewards[:, None], per_func.T, batch.completion_mask.sum(1).float()[:, None], batch.truncated.float()[:, None],
        ], dim=1)  # [B*G, 1 + F + 2]
        gathered = all_gather_cat(per_completion.to(self.device)).cpu()
        rewards, per_func = gathered[:, 0], gathered[:, 1 : 1 + len(self.reward_funcs)].T
        lengths, truncated = gathered[:, -2], gathered[:, -1]
        record = {"step": self.step, **stats, "reward": rewards.mean().item(), "reward_std": rewards.std().item()}
        for func, values in zip(self.reward_funcs, per_func):
            valid = values[~values.isnan()]
            name = reward_name(func)
            record[f"rewards/{name}/mean"] = valid.mean().item() if len(valid) else None
            record[f"rewards/{name}/std"] = valid.std().item() if len(valid) > 1 else None
        record.update({
            "lr": self.opt.lr,
            "completion_length/mean": lengths.mean().item(),
            "completion_length/min": lengths.min().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_frac": truncated.mean().item(),
            "frac_reward_zero_std": (rewards.view(-1, G).std(1) < 1e-6).float().mean().item(),
            "step_time": step_time,
            "tokens_per_sec": float(lengths.sum()) / step_time,
        })
        return record

    def _log_samples(self, log: MetricsLog, batch: Rollout, rewards, per_func, advantages) -> None:
        names = [reward_name(func) for func in self.reward_funcs]
        samples = []
        for i in range(min(self.config.log_completions, len(batch.texts))):
            row = batch.rows[i // self.config.group_size]
            each = {name: None if value.isnan() else value.item() for name, value in zip(names, per_func[:, i])}
            samples.append({"id": row.get("id"), "completion": batch.texts[i], "reward": rewards[i].item(),
                            "rewards": each, "advantage": advantages[i].item()})
        log.write_completions(self.step, samples)
