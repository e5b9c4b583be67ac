"""What the GRPO and SFT trainers share: the run's config fields and the run around a step.

`TrainingConfig` holds the fields every run has (model loading, optimisation, scale-out,
checkpoints, logging, long-run guards); `GRPOConfig` and `SFTConfig` extend it with their own.
`BaseTrainer` is the run: process and model set-up, then in `train()` the stop-signal guard,
resuming, the output directory, the metrics log, and after each step the record, the checkpoint
and the stop decision. A trainer adds only its own step (`train_step`).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import lora
from .checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint, start_output_dir
from .config import ConfigMixin
from .distributed import (
    check_master_weights, default_device, init_distributed, is_main_process, launched_distributed, shard, world,
)
from .loading import prepare_model
from .resilience import STOP_SIGNALS, RunGuard, check_guard_settings
from .tracking import MetricsLog, require_trackers


@dataclass
class TrainingConfig(ConfigMixin):
    """The fields of every training run. Defaults are GRPO's (the paper's); SFTConfig restates the ones it changes."""

    output_dir: str = "runs/grpo"  # metrics.jsonl and checkpoint-<step>/ go here; one run per directory
    max_prompt_length: int = 1024  # prompt tokens; a longer prompt is an error naming the row (never cut through an image)
    max_completion_length: int = 1024  # GRPO: new tokens per completion; SFT: longer targets are cut (truncated_frac)
    # Arguments for every rendering of the chat template (rollout, log-probs, SFT targets, evaluation); set
    # {"enable_thinking": True} on Qwen3.5 to train the think/answer format (docs/families.md: Real checkpoints).
    chat_template_kwargs: dict | None = None
    # optimisation (AdamW)
    learning_rate: float = 1e-6  # peak learning rate after warmup; RL updates want it small (the paper's 1e-6)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (pulls weights toward 0); 0 = none
    adam_betas: tuple[float, float] = (0.9, 0.99)  # AdamW's moment decay rates; a lower beta2 forgets old gradient scales sooner
    warmup_steps: int = 0  # linear warmup, in optimizer updates; raise it if early updates are unstable
    lr_scheduler: str = "constant"  # after warmup: constant | cosine (decays towards 0 by the last update)
    max_grad_norm: float = 1.0  # clip the gradient's global norm to this; guards against rare huge updates
    max_steps: int = 2000  # training steps: the run ends after this many
    seed: int = 0  # seeds data order, sampling and initialisation: change it for an independent repeat of a run
    freeze_vision_tower: bool = True  # the paper trains the language model only; False also trains the image encoder
    dtype: str = "auto"  # for from_pretrained: auto | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    master_weights: bool = True  # step bf16/fp16 weights via fp32 copies (docs/scale-out.md: Memory guide); False: 12 B/param less, small updates lost
    # Train a LoRA adapter instead of every weight, to fit a larger model (PEFT; grpo/lora.py, docs/lora.md).
    # None = full fine-tuning; a dict of r, alpha, dropout, target_modules, lora_vision (or a peft.LoraConfig)
    # trains a fresh adapter, GRPO's reference being the policy with its adapters off. A model that already
    # carries an adapter continues it with lora=None.
    lora: dict | None = None
    # scale-out (grpo/distributed.py); a step's rows are global and split evenly over the processes
    deepspeed: str | dict | None = None  # None | "zero2" | "zero3" | path to a DeepSpeed JSON | a dict
    offload_optimizer: bool = False  # DeepSpeed: optimizer states in CPU memory (fits a larger model, slower steps)
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory (fits a larger model, slower steps)
    # checkpoints and logging
    save_steps: int = 500  # checkpoint every N steps and at the end; 0 = only at the end
    save_total_limit: int | None = None  # keep only the newest N checkpoints (older ones removed); None keeps all
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    overwrite_output_dir: bool = False  # a fresh run may replace the results of an earlier run in output_dir
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard | wandb | mlflow
    # long runs (grpo/resilience.py)
    stop_signals: tuple[str, ...] = STOP_SIGNALS  # these finish the step, checkpoint and exit with EXIT_PREEMPTED
    max_consecutive_bad_steps: int = 3  # updates with a non-finite loss / grad norm are skipped; this many in a row stop

    def __post_init__(self):
        self.report_to = require_trackers(self.report_to)
        check_guard_settings(self)
        lora.check_settings(self.lora, type(self).__name__)
        check_master_weights(self)

    def micro_batches(self, processes: int) -> int:
        """Micro-batches per optimizer update on each of `processes` processes; an error naming the
        fields when a step does not split evenly. Each trainer's config defines it."""
        raise NotImplementedError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_processes(cfg) -> torch.device:
    """Join the process group a launcher started (if any) and return this process's device."""
    if launched_distributed() and not cfg.deepspeed:
        raise ValueError(
            f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but deepspeed is None: multi-process training runs "
            f"on DeepSpeed; set deepspeed='zero2' (replicated weights) or 'zero3' (sharded weights)")
    init_distributed(bool(cfg.deepspeed))
    return default_device()


def rows_for_step(dataset, step: int, per_step: int, seed: int, name: str) -> tuple[list[dict], list[int]]:
    """This process's rows of a step and their indices: a seeded permutation per epoch, so the data
    position is a function of the step (resuming continues exactly); `per_step` rows over all
    processes, split evenly (`name` is the config field that sets it, for the error)."""
    indices = shard(step_row_indices(len(dataset), step, per_step, seed), name)  # a group never spans processes
    return [dataset[i] for i in indices], indices


def step_row_indices(dataset_size: int, step: int, per_step: int, seed: int) -> list[int]:
    """The row indices of a step over all processes (`rows_for_step` before the split)."""
    indices = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, dataset_size)
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch))
        indices.append(int(order[offset]))
    return indices


# Seeds of consecutive runs' epoch permutations never collide for fewer than this many epochs (a prime).
_EPOCH_SEED_STRIDE = 7919


class BaseTrainer:
    """The run around a trainer's step. A trainer sets the class attributes below, builds `self.opt`
    and `self.train_dataset` after `BaseTrainer.__init__`, and defines `train_step`."""

    label: str  # names the run on the progress line and in messages: "grpo" | "sft"
    rows_per_step: str  # the config field that sets a step's rows over all processes
    progress_shown: dict[str, str]  # the progress line: label -> metrics key
    logs_completions = False  # whether the run keeps completions.jsonl

    def __init__(self, model, processor, config: TrainingConfig):
        """Join the processes, check the step splits over them (before any model loads), seed, load the model."""
        self.config = config
        self.device = setup_processes(config)
        rank, size = world()
        config.micro_batches(size)
        seed_everything(config.seed + rank)
        self.model, self.processor, self.family = prepare_model(model, processor, config, self.device)
        self.step = 0
        self.guard = RunGuard(config, self.device, self.label)

    def train_step(self) -> tuple[dict, list[dict]]:
        """One training step (advancing `self.step`): its metrics record and the completions to log."""
        raise NotImplementedError

    def train(self) -> list[dict]:
        """Run to max_steps; a stop signal ends it after a step with a checkpoint (raises Preempted).
        Returns every step's metrics record."""
        cfg = self.config
        with self.guard:
            log = self._start()
            history = []
            while self.step < cfg.max_steps:
                record, completions = self.train_step()
                history.append(record)
                if log is not None:
                    log.write(record)
                    if self.logs_completions:
                        log.write_completions(self.step, completions)
                saved = None
                if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.max_steps:
                    saved = self.save(self.step)
                self.guard.finish_step(self.step, saved, self.save)
            if log is not None:
                log.close()
            return history

    def _start(self) -> MetricsLog | None:
        """Resume from a checkpoint if asked, make the output directory ready, and open the metrics
        log (process 0; None elsewhere)."""
        cfg = self.config
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        if resume:
            state = load_checkpoint(resume, self.opt)
            self.step = state["step"]
            self.guard.load_state(state)
        start_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
        if not is_main_process():
            return None
        return MetricsLog(cfg, self.step if resume else None, self.label, self.progress_shown,
                          completions=self.logs_completions)

    def _rows_for_step(self, step: int) -> tuple[list[dict], list[int]]:
        cfg = self.config
        return rows_for_step(self.train_dataset, step, getattr(cfg, self.rows_per_step), cfg.seed, self.rows_per_step)

    def save(self, step: int) -> str:
        return save_checkpoint(self.config.output_dir, step, self.opt, self.processor,
                               {"config": asdict(self.config), **self.guard.state()}, self.config.save_total_limit)
