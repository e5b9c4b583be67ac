"""GRPO trainer: sample G completions per prompt -> score -> group advantages -> clipped update with KL.

One training step, `Trainer.train_step` (the run around it, `train()`, is grpo/run.py's `BaseTrainer`):
  1. `rollout`   take `prompts_per_step` rows, sample G completions each (grpo.sampling.generate).
  2. `score`     call every reward function (async ones concurrently); weighted sum -> rewards [N].
     grpo.dynamic_sampling.dynamic_sample (only with dynamic_sampling, DAPO): drop the groups whose
                 rewards are all equal and sample more prompts until the step has prompts_per_step
                 informative ones.
  3. `logprob_passes`  without gradient: old-policy log-probs (only when num_iterations > 1), token
                 entropies and the high-entropy token mask (only when top_entropy_fraction < 1),
                 reference log-probs (only when beta > 0).
  4. `advantages` grpo.objective.group_advantages, per group of G.
  5. `update`    num_iterations optimizer updates, each accumulating gradients over micro-batches of
                 `completions_per_micro_batch` completions, loss = grpo.objective.grpo_loss, each
                 weighted by grpo.objective.micro_batch_weights.
Shapes use grpo/objective.py's notation: B prompts, G completions each, N = B x G, C completion tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from . import lora
from .distributed import Optimization, all_gather_cat, all_reduce_sum, check_images_on_every_rank, world
from .decoding import StaticDecoder, wants_compiled_decoding
from .dynamic_sampling import dynamic_sample
from .objective import (
    ADVANTAGE_ESTIMATORS, SCALE_MODES, Objective, check_objective, group_advantages, grpo_loss, high_entropy_mask,
    micro_batch_weights, zero_spread_groups,
)
from .evaluate import accuracy_name, evaluate
from .loading import prepare_reference_model, vision_modules_equal, vision_trains
from .logprobs import group_logprobs, with_image_features
from .prompts import PromptBatch, column, encode_prompts
from .run import BaseTrainer, TrainingConfig
from .sampling import SamplingParams, decode_completions, generate
from .templates import check_reasoning_fits
from .scoring import call_reward_functions, combine_rewards, reward_columns, reward_name, reward_stats


# Dynamic sampling's later rounds sample with seeds above every step's first-round seed.
_ROUND_SEED_OFFSET = 2**32


@dataclass
class GRPOConfig(TrainingConfig):
    """GRPO hyper-parameters, beside every run's (grpo/run.py's TrainingConfig). Defaults are the
    paper's (PathVLM-R1) where it gives them."""

    output_dir: str = "runs/grpo"  # metrics.jsonl, completions.jsonl and checkpoints go here
    # rollout
    group_size: int = 4  # G: completions sampled per prompt; a larger G gives a steadier group baseline, at more sampling
    prompts_per_step: int = 8  # prompts per training step, over all processes; completions per step = prompts_per_step * G
    completions_per_micro_batch: int = 8  # completions per forward/backward (gradient accumulation unit); lower it to save memory
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature
    top_p: float = 1.0  # nucleus sampling: keep the smallest token set of this probability; 1 = off (the paper's)
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    # objective (docs/objective.md: every term, level and aggregation with its formula and source)
    beta: float = 0.04  # KL coefficient; 0 loads no reference model
    epsilon_low: float = Objective.epsilon_low  # lower clip: rho >= 1 - epsilon_low
    epsilon_high: float | None = Objective.epsilon_high  # upper clip: rho <= 1 + epsilon_high (None = epsilon_low; DAPO 0.28)
    loss_type: str = Objective.loss_type  # aggregation over tokens: grpo | bnpo | dr_grpo | dapo
    policy_loss: str = Objective.policy_loss  # per-token policy term: clip (PPO/GRPO) | cispo (MiniMax-M1) | sapo (soft gate)
    importance_sampling_level: str = Objective.importance_sampling_level  # token | sequence (GSPO: one ratio per completion)
    scale_rewards: str = "group"  # advantages divided by the std of: group | batch | none
    advantage_estimator: str = "grpo"  # baseline: grpo (group mean) | rloo (mean of the other G - 1)
    num_iterations: int = 1  # mu: optimizer updates per rollout batch
    mask_truncated_completions: bool = False  # drop completions without EOS from the loss (DAPO)
    dual_clip: float | None = Objective.dual_clip  # verl's dual-clip c (e.g. 3): caps a negative-advantage token's loss at -c*A
    delta: float | None = Objective.delta  # two-sided clip (INTELLECT-2, e.g. 4): the unclipped branch's ratio capped at delta
    cispo_max_ratio: float = Objective.cispo_max_ratio  # CISPO: importance weights truncated at this ratio
    sapo_temperature_pos: float = Objective.sapo_temperature_pos  # SAPO: gate temperature of tokens with A > 0
    sapo_temperature_neg: float = Objective.sapo_temperature_neg  # SAPO: gate temperature of tokens with A < 0
    top_entropy_fraction: float = 1.0  # policy term on this top fraction of the step's tokens by entropy (80/20: 0.2)
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards, sample more prompts to refill the step
    max_sampling_rounds: int = 3  # dynamic sampling: at most this many rounds of prompts_per_step prompts per step
    # Share each prompt across its G completions: the plain path's numbers with less work. Image features
    # are computed once per step, each prompt forwarded once per log-prob pass with its G completions:
    # packed into one sequence under a mask where the family's layers all attend fully (Qwen2/2.5/3-VL,
    # InternVL; also under gradient_checkpointing), else attending to the prompt's KV cache (Gemma 3,
    # Qwen3.5; these fall back to the plain path under gradient_checkpointing, which turns the cache
    # off). With freeze_vision_tower=False the vision tower runs again, once per prompt, with gradient.
    # False = plain path: each completion its own prompt, in the rollout too (each copy prefilled,
    # its image through the vision tower).
    # Runs under DeepSpeed ZeRO-2/3 too (tests/test_distributed.py); benchmarks/README.md has the speed-up.
    # A model of no known family runs the plain path whatever this says (docs/families.md).
    shared_prefix: bool = True
    # Decode with static shapes (a cache preallocated for the whole completion, masks of one shape)
    # through one torch.compile'd forward, CUDA graphs on a GPU: the same tokens (grpo/decoding.py).
    # "auto": on for CUDA; off on the CPU, where compiling costs more than it saves in a short run. True | False.
    compile_decode: bool | str = "auto"
    # evaluation and logging
    log_completions: int = 4  # completions per step written to completions.jsonl (0 = none)
    eval_steps: int = 0  # evaluate on eval_dataset every N steps (0 = off)
    eval_batch_size: int = 32  # eval rows decoded together; lower it if evaluation runs out of memory
    accuracy: str | None = None  # eval reward reported as eval/accuracy, by name; None: the first marked is_accuracy

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2 (got {self.group_size}): advantages compare within a group")
        completions = self.prompts_per_step * self.group_size
        if self.completions_per_micro_batch < 1 or completions % self.completions_per_micro_batch:
            raise ValueError(
                f"completions_per_micro_batch={self.completions_per_micro_batch} must divide the completions per "
                f"step = prompts_per_step {self.prompts_per_step} x group_size {self.group_size} = {completions}"
            )
        check_objective(**self.objective_settings())
        if self.scale_rewards not in SCALE_MODES:
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}; valid: {', '.join(SCALE_MODES)}")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage_estimator {self.advantage_estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
        if not 0 < self.top_entropy_fraction <= 1:
            raise ValueError(f"top_entropy_fraction must be in (0, 1] (1 = every token; the 80/20 rule: 0.2), "
                             f"got {self.top_entropy_fraction}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}: GRPO samples its G completions "
                             f"(greedy ones would be identical) and divides logits by it")
        self.sampling_params()  # checks top_p, top_k and max_completion_length
        if self.compile_decode not in (True, False, "auto"):  # before any model is loaded
            raise ValueError(f"compile_decode must be 'auto', True or False, got {self.compile_decode!r}")

    def micro_batches(self, processes: int) -> int:
        if self.prompts_per_step % processes:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} must be divisible by the number of processes ({processes})")
        local_completions = self.prompts_per_step // processes * self.group_size
        if local_completions % self.completions_per_micro_batch:
            raise ValueError(
                f"completions_per_micro_batch={self.completions_per_micro_batch} must divide the completions per process = "
                f"prompts_per_step {self.prompts_per_step} / {processes} processes x group_size {self.group_size} = {local_completions}")
        return local_completions // self.completions_per_micro_batch

    def objective_settings(self) -> dict:
        """The per-token objective's settings (`Objective`'s fields), as `grpo_loss` and `check_objective` take them."""
        return {name: getattr(self, name) for name in Objective.__dataclass_fields__}

    def sampling_params(self) -> SamplingParams:
        """How the rollout draws its completions."""
        return SamplingParams(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


# The progress line: label -> metrics key (the eval accuracy shows its last value between evaluations;
# none when no eval reward measures correctness: grpo.evaluate.accuracy_name).
PROGRESS_SHOWN = {"reward": "reward", "kl": "kl", "eval acc": "eval/accuracy"}


@dataclass
class Rollout:
    """Everything one step carries from sampling to the update (prompt-major, completion i -> prompt i // G)."""

    rows: list[dict]
    prompts: PromptBatch  # B prompts
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C]
    truncated: torch.Tensor  # [N]
    texts: list[str] = field(default_factory=list)
    old_logprobs: torch.Tensor | None = None  # [N, C] only when num_iterations > 1
    ref_logprobs: torch.Tensor | None = None  # [N, C] only when beta > 0
    entropies: torch.Tensor | None = None  # [N, C] rollout policy's token entropies, only when top_entropy_fraction < 1
    token_mask: torch.Tensor | None = None  # [N, C] tokens that get the policy term (high_entropy_mask), likewise
    row_indices: list[int] = field(default_factory=list)  # the rows' dataset indices (named when a step is skipped)


class Trainer(BaseTrainer):
    """GRPO on a Hugging Face vision-language model.

    `train_dataset`: a list, a `datasets.Dataset` or any indexable sequence of rows; each row needs
    `prompt` (chat messages) and `image` (PIL image, path, lazy image or {bytes, path}) or `images`; every other field is passed to the reward functions
    as a column. `reward_funcs`: callables `f(prompts, completions, **columns) -> list[float | None]`
    (sync or async). `model`: a loaded model or a name/path for `from_pretrained`.
    """

    label = "grpo"
    rows_per_step = "prompts_per_step"
    progress_shown = PROGRESS_SHOWN
    logs_completions = True

    def __init__(self, model, processor, reward_funcs, train_dataset, config: GRPOConfig | None = None,
                 reward_weights=None, ref_model=None, eval_dataset=None, eval_reward_funcs=None):
        super().__init__(model, processor, config or GRPOConfig())
        cfg = self.config
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not self.reward_funcs:
            raise ValueError("at least one reward function is needed")
        check_reasoning_fits(self.family.template, [*self.reward_funcs, *(eval_reward_funcs or [])])
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
        accuracy_name(self.eval_reward_funcs, cfg.accuracy)  # a misspelt name fails now, not at the first evaluation
        names = [reward_name(f) for f in self.reward_funcs]  # the training rewards' accuracy, logged as "accuracy"
        self._train_accuracy = accuracy_name(self.reward_funcs, cfg.accuracy if cfg.accuracy in names else None)
        # The reference is copied before DeepSpeed partitions the policy, sharing its frozen vision
        # tower. Under LoRA there is none to copy (ref_model stays None): the policy with its adapters
        # switched off is the reference.
        self.ref_model = prepare_reference_model(ref_model, self.model, self.family, cfg, self.device) if cfg.beta > 0 else None
        self.vision_trains = vision_trains(self.family, self.model)
        # The reference may reuse the policy's image features only while both towers are the same and frozen.
        if self.ref_model is not None:
            self.ref_shares_vision = not self.vision_trains and vision_modules_equal(
                self.family.vision_modules(self.model), self.family.vision_modules(self.ref_model))
        else:
            self.ref_shares_vision = cfg.beta > 0 and not lora.adapts(self.family.vision_modules(self.model))
        self.opt = Optimization(self.model, cfg, total_updates=cfg.max_steps * cfg.num_iterations,
                                micro_batches_per_update=cfg.micro_batches(world()[1]),
                                micro_batch_size=cfg.completions_per_micro_batch)
        self.decoder = StaticDecoder() if wants_compiled_decoding(cfg.compile_decode, self.device) else None

    @property
    def policy(self):
        """What forwards run on: the DeepSpeed engine when there is one, else the model."""
        return self.opt.module

    # ------------------------------------------------------------------ the step
    def train_step(self) -> tuple[dict, list[dict]]:
        """One GRPO step; returns its metrics record and the completions to log."""
        cfg = self.config
        t0 = time.time()
        rows, row_indices = self._rows_for_step(self.step)
        batch = self.rollout(rows, row_indices, self._generator())
        rewards, per_func = self.score(batch)  # [N], [F, N]
        counters = {}
        if cfg.dynamic_sampling:
            batch, rewards, per_func, counters = dynamic_sample(
                batch, rewards, per_func, cfg, self.step, len(self.train_dataset), self.family.pad_id, self._sample_round,
                self._regrouped)
        self.logprob_passes(batch)
        advantages = self.advantages(rewards)
        stats = self.update(batch, advantages)
        self.step += 1
        record = {**self._metrics(batch, rewards, per_func, stats, time.time() - t0), **counters}
        record.update(self.guard.end_step(self.step, self.opt, {k: stats[k] for k in ("loss", "grad_norm")},
                                          batch.rows, batch.row_indices))
        # Reward-side counters are read before evaluation, so they count this step's training calls only.
        record.update(reward_stats(self.reward_funcs))
        if cfg.eval_steps and self.eval_dataset is not None and (self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps):
            record.update(self.evaluate())
        return record, self._completions_to_log(batch, rewards, per_func, advantages)

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def rollout(self, rows: list[dict], row_indices: list[int], generator: torch.Generator) -> Rollout:
        """G sampled completions for each of this process's prompts (no log-probs yet: `logprob_passes`)."""
        prompts = self._prompts(rows, row_indices)
        out = generate(self.family, self.policy, prompts, self.config.sampling_params(), group_size=self.config.group_size,
                       decoder=self.decoder,
                       generator=generator, synced=self.opt.zero_stage == 3, shared_prefix=self.config.shared_prefix)
        batch = Rollout(rows, prompts, out.ids, out.mask, out.truncated, row_indices=list(row_indices))
        batch.texts = decode_completions(self.family, out)
        return batch

    @torch.no_grad()
    def _prompts(self, rows: list[dict], row_indices: list[int]) -> PromptBatch:
        """The rows encoded for the model, with their image features computed once (shared_prefix)."""
        prompts = encode_prompts(self.family, rows, row_indices, self.config.max_prompt_length).to(self.device)
        if self.opt.zero_stage == 3:  # a process without images would skip the tower's collective forward
            check_images_on_every_rank(prompts.images_per_prompt, row_indices, self.device)
        self.opt.train(False)
        if self.config.shared_prefix:
            prompts = with_image_features(self.family, self.model, prompts)  # vision once, for the rollout and every pass
        return prompts

    @torch.no_grad()
    def logprob_passes(self, batch: Rollout) -> None:
        """Fill in what the update needs from forwards without gradient: old-policy log-probs
        (num_iterations > 1), the rollout policy's token entropies and the high-entropy token mask
        over the whole step, all processes (top_entropy_fraction < 1), reference log-probs (beta > 0)."""
        cfg = self.config
        self.opt.train(False)
        with_entropy = cfg.top_entropy_fraction < 1
        if cfg.num_iterations > 1 or with_entropy:
            logprobs = self._logprobs_all(self.policy, batch, with_entropy=with_entropy)
            if with_entropy:
                logprobs, batch.entropies = logprobs
                batch.token_mask = high_entropy_mask(batch.entropies, self._loss_mask(batch), cfg.top_entropy_fraction)
            if cfg.num_iterations > 1:
                batch.old_logprobs = logprobs
        if cfg.beta > 0:
            batch.ref_logprobs = self.reference_logprobs(batch)

    def _loss_mask(self, batch: Rollout) -> torch.Tensor:
        """[N, C] the completion tokens the loss counts (without the truncated completions when asked)."""
        mask = batch.completion_mask.clone()
        if self.config.mask_truncated_completions:
            mask[batch.truncated] = 0
        return mask

    @torch.no_grad()
    def reference_logprobs(self, batch: Rollout) -> torch.Tensor:
        """Log-probs [N, C] under the frozen reference: the reference model, or under LoRA the policy
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

    def _logprobs(self, model, batch: Rollout, index, prompts, prompt_index, with_entropy: bool = False):
        return group_logprobs(self.family, model, prompts, prompt_index, batch.completion_ids[index],
                              batch.completion_mask[index], self.config.temperature, shared_prefix=self.config.shared_prefix,
                              with_entropy=with_entropy)

    def _logprobs_all(self, model, batch: Rollout, prompts: PromptBatch | None = None, with_entropy: bool = False):
        """Log-probs [N, C] of every completion under `model` (`prompts`: batch.prompts by default);
        with_entropy: (log-probs, token entropies)."""
        parts = [self._logprobs(model, batch, *part, with_entropy=with_entropy)
                 for part in self._micro_batches(batch, batch.prompts if prompts is None else prompts)]
        if with_entropy:
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)

    def score(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [N] (weighted sum) and the per-function matrix [F, N] (NaN where None)."""
        G = self.config.group_size
        rows = [row for row in batch.rows for _ in range(G)]
        columns = reward_columns(rows, batch.completion_ids, batch.completion_mask)
        results = call_reward_functions(self.reward_funcs, [row["prompt"] for row in rows], batch.texts, columns)
        return combine_rewards(results, self.reward_weights)

    def _sample_round(self, row_indices: list[int], round_: int):
        """Dynamic sampling's round `round_` on this process's rows `row_indices`: (rollout, rewards, per_func)."""
        batch = self.rollout([self.train_dataset[i] for i in row_indices], row_indices, self._generator(round_))
        return (batch, *self.score(batch))

    def _regrouped(self, row_indices: list[int], completion_ids, completion_mask, truncated, texts) -> Rollout:
        """A rollout of the groups dynamic sampling chose for this process (some sampled on another one:
        their prompts are encoded again here, from the dataset rows)."""
        rows = [self.train_dataset[i] for i in row_indices]
        return Rollout(rows, self._prompts(rows, row_indices), completion_ids.to(self.device),
                       completion_mask.to(self.device), truncated, texts, row_indices=row_indices)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group-normalised advantages [N] of this process's completions.

        Computed over every process's rewards, so scale_rewards="batch" divides by the std of the
        whole step's batch, exactly as on one process; groups never span processes.
        """
        everything = all_gather_cat(rewards.to(self.device))  # [world * N]
        advantages = group_advantages(everything, self.config.group_size, scale=self.config.scale_rewards,
                                      estimator=self.config.advantage_estimator)
        rank, _ = world()
        return advantages[rank * len(rewards) : (rank + 1) * len(rewards)].cpu()

    def update(self, batch: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """num_iterations optimizer updates over the rollout; returns loss/kl/clip_ratio/dual_clip_ratio/grad_norm.

        Each micro-batch's loss is weighted by `micro_batch_weights` (the one rule for every
        aggregation and process count), so that the update and the logged numbers are the whole
        step's batch on a single process.
        """
        cfg = self.config
        _, size = world()
        self.opt.train(True)
        mask = self._loss_mask(batch)
        n = mask.shape[0]
        step_tokens = all_reduce_sum(mask.sum().to(self.device).float()).clamp(min=1).cpu()  # dapo's num_items_in_batch
        advantages = advantages.to(self.device)
        averaged = ("kl", "clip_ratio", "dual_clip_ratio")  # grpo_loss's stats, averaged over the step's completions
        totals = {"loss": 0.0, "grad_norm": 0.0, **dict.fromkeys(averaged, 0.0)}
        # Cached image features carry no gradient: a trainable vision tower must see the pixels again.
        prompts = batch.prompts.without_features() if self.vision_trains else batch.prompts
        for _ in range(cfg.num_iterations):
            for index, micro_prompts, prompt_index in self._micro_batches(batch, prompts):
                logprobs = self._logprobs(self.policy, batch, index, micro_prompts, prompt_index)  # [len(index), C]
                old = batch.old_logprobs[index] if batch.old_logprobs is not None else logprobs.detach()
                ref = batch.ref_logprobs[index] if batch.ref_logprobs is not None else None
                token_mask = batch.token_mask[index] if batch.token_mask is not None else None
                loss, stats = grpo_loss(
                    logprobs, old, advantages[index], mask[index].to(self.device), ref_logprobs=ref, beta=cfg.beta,
                    max_completion_length=cfg.max_completion_length, num_items_in_batch=step_tokens.to(self.device),
                    token_mask=token_mask, **cfg.objective_settings(),
                )
                weights = micro_batch_weights(cfg.loss_type, len(index), n, size)
                self.opt.backward(loss * weights.backward)
                totals["loss"] += loss.item() * weights.logged / cfg.num_iterations
                for key in averaged:
                    totals[key] += float(stats[key]) * weights.stats / cfg.num_iterations
            totals["grad_norm"] += self.opt.step() / cfg.num_iterations
        reduced = all_reduce_sum(torch.tensor([totals["loss"], *(totals[k] for k in averaged)], device=self.device)).tolist()
        totals.update(zip(("loss", *averaged), reduced))
        return totals

    def _generator(self, round_: int = 0) -> torch.Generator:
        """The sampling generator of this step (and round, for dynamic sampling's later ones) on this process."""
        seed = self.config.seed * 1_000_003 + self.step * 1009 + world()[0] + round_ * _ROUND_SEED_OFFSET
        return torch.Generator(device=self.device).manual_seed(seed)

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.policy, self.processor, self.eval_dataset, self.eval_reward_funcs,
                          batch_size=self.config.eval_batch_size, max_completion_length=self.config.max_completion_length,
                          synced=self.opt.zero_stage == 3, accuracy=self.config.accuracy, decoder=self.decoder,
                          chat_template_kwargs=self.config.chat_template_kwargs)
        result = {k: v for k, v in result.items() if k != "records"}
        result.update(reward_stats(self.eval_reward_funcs))  # the evaluation's own judge traffic, say
        return {f"eval/{k}": v for k, v in result.items()}

    # ------------------------------------------------------------------ logging
    def _metrics(self, batch: Rollout, rewards, per_func, stats, step_time) -> dict:
        """One metrics.jsonl record for the whole step: per-completion values are gathered from every
        process first, so the numbers do not depend on how many processes ran the step."""
        G = self.config.group_size
        columns = [rewards[:, None], per_func.T, batch.completion_mask.sum(1).float()[:, None], batch.truncated.float()[:, None]]
        per_completion = torch.cat([c.to(self.device) for c in columns], dim=1)  # [N, 1 + F + 2]; rewards are on the CPU
        gathered = all_gather_cat(per_completion).cpu()
        rewards, per_func = gathered[:, 0], gathered[:, 1 : 1 + len(self.reward_funcs)].T
        lengths, truncated = gathered[:, -2], gathered[:, -1]
        record = {"step": self.step, **stats, "reward": rewards.mean().item(), "reward_std": rewards.std().item()}
        for func, values in zip(self.reward_funcs, per_func):
            valid = values[~values.isnan()]
            name = reward_name(func)
            record[f"rewards/{name}/mean"] = valid.mean().item() if len(valid) else None
            record[f"rewards/{name}/std"] = valid.std().item() if len(valid) > 1 else None
        if self._train_accuracy is not None:  # the rollouts' accuracy, by the rule evaluation uses (plots read it)
            record["accuracy"] = record[f"rewards/{self._train_accuracy}/mean"]
        record.update({
            "lr": self.opt.lr,
            "completion_length/mean": lengths.mean().item(),
            "completion_length/min": lengths.min().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_frac": truncated.mean().item(),
            "frac_reward_zero_std": zero_spread_groups(rewards, G).float().mean().item(),
            "step_time": step_time,
            "tokens_per_sec": float(lengths.sum()) / step_time,
        })
        if batch.entropies is not None:  # the rollout policy's mean token entropy, the share of tokens with a policy term
            mask = batch.completion_mask.to(batch.entropies.dtype)
            sums = all_reduce_sum(torch.stack([(batch.entropies * mask).sum(), mask.sum(), batch.token_mask.sum()]).float())
            record.update({"entropy": (sums[0] / sums[1]).item(), "entropy_mask_frac": (sums[2] / sums[1]).item()})
        return record

    def _completions_to_log(self, batch: Rollout, rewards, per_func, advantages) -> list[dict]:
        """The step's first `log_completions` completions as completions.jsonl rows."""
        names = [reward_name(func) for func in self.reward_funcs]
        samples = []
        for i in range(min(self.config.log_completions, len(batch.texts))):
            row = batch.rows[i // self.config.group_size]
            each = {name: None if value.isnan() else value.item() for name, value in zip(names, per_func[:, i])}
            samples.append({"id": row.get("id"), "completion": batch.texts[i], "reward": rewards[i].item(),
                            "rewards": each, "advantage": advantages[i].item()})
        return samples
