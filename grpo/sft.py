"""Supervised fine-tuning (the paper's knowledge-injection stage): loss on the assistant tokens only.

Rows carry `prompt` (chat messages), `image`/`images`, and `completion`: the assistant text
(e.g. "<think>...</think><answer>B) ...</answer>"); the end-of-turn token is appended and trained on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from . import lora
from .config import ConfigMixin
from .distributed import (
    Optimization, all_reduce_sum, check_images_on_every_rank, check_master_weights, is_main_process, world,
)
from .logprobs import plain_logprobs
from .prompts import column, encode_prompts
from .templates import check_targets_fit
from .tracking import MetricsLog, require_trackers
from .resilience import STOP_SIGNALS, RunGuard, check_guard_settings
from .training import (
    load_checkpoint, prepare_model, resolve_checkpoint, rows_for_step, save_checkpoint,
    seed_everything, setup_processes, start_output_dir,
)


@dataclass
class SFTConfig(ConfigMixin):
    """SFT hyper-parameters."""

    output_dir: str = "runs/sft"
    batch_size: int = 8  # rows per optimizer step, over all processes
    micro_batch_size: int = 8  # rows per forward/backward on one process; must divide batch_size / processes
    max_prompt_length: int = 1024
    max_completion_length: int = 1024  # longer targets are cut (their fraction is logged as truncated_frac)
    # Arguments for every rendering of the chat template (rollout, log-probs, SFT targets, evaluation),
    # e.g. {"enable_thinking": True} on Qwen3.5 to train the think/answer format (README: Real checkpoints).
    chat_template_kwargs: dict | None = None
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_scheduler: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0
    max_steps: int = 1000
    seed: int = 0
    freeze_vision_tower: bool = True
    dtype: str = "auto"  # for from_pretrained: auto | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    master_weights: bool = True  # step bf16/fp16 weights via fp32 copies (README: Memory guide); False: 12 B/param less, small updates lost
    lora: dict | None = None  # LoRA through PEFT, as GRPOConfig.lora: None = full fine-tuning (README: LoRA)
    deepspeed: str | dict | None = None  # None | "zero2" | "zero3" | path to a DeepSpeed JSON | a dict
    offload_optimizer: bool = False  # DeepSpeed: optimizer states in CPU memory
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory
    save_steps: int = 500  # 0 = only at the end
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    overwrite_output_dir: bool = False  # a fresh run may replace the results of an earlier run in output_dir
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard | wandb | mlflow
    stop_signals: tuple[str, ...] = STOP_SIGNALS  # finish the step, checkpoint, exit with EXIT_PREEMPTED
    max_consecutive_bad_steps: int = 3  # updates with a non-finite loss / grad norm are skipped; this many in a row stop

    def __post_init__(self):
        self.report_to = require_trackers(self.report_to)
        check_guard_settings(self)
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size}")
        lora.check_settings(self.lora, "SFTConfig")
        check_master_weights(self)


def encode_targets(family, rows: list[dict], row_indices: list[int], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded target ids [N, T], their mask, and how many targets were cut to fit `max_length`.

    A row's target is its `completion` as the chat template renders the assistant turn after the
    generation prompt (`ChatTemplate.continuation`: Gemma trims it, Qwen3.5 rewrites a think block
    the prompt opened), up to and including the end-of-turn token, which the model learns to emit.
    """
    end_id = family.end_of_turn_id if family.end_of_turn_id is not None else family.eos_ids[0]
    full = []
    for row, index in zip(rows, row_indices):
        text = family.template.continuation(row["prompt"], row["completion"], index)
        ids = family.tokenizer(text, add_special_tokens=False)["input_ids"]
        ends = [k for k, token in enumerate(ids) if token == end_id]
        full.append(ids[: ends[-1]] if ends else ids)  # what follows the turn's end ("\n") is not the model's
    cut = sum(len(ids) > max_length - 1 for ids in full)
    targets = [ids[: max_length - 1] + [end_id] for ids in full]
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), family.pad_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for i, target in enumerate(targets):
        ids[i, : len(target)] = torch.tensor(target)
        mask[i, : len(target)] = 1
    return ids, mask, cut


PROGRESS_SHOWN = {"loss": "loss", "tok/s": "tokens_per_sec"}  # the progress line: label -> metrics key


class SFTTrainer:
    """Next-token cross-entropy on the assistant completion, prompt tokens masked out."""

    def __init__(self, model, processor, train_dataset, config: SFTConfig | None = None):
        self.config = config or SFTConfig()
        cfg = self.config
        self.device = setup_processes(cfg)
        rank, size = world()
        if cfg.batch_size % size or (cfg.batch_size // size) % cfg.micro_batch_size:
            raise ValueError(f"batch_size={cfg.batch_size} must split into {size} processes x whole micro-batches of "
                             f"micro_batch_size={cfg.micro_batch_size}")
        seed_everything(cfg.seed + rank)
        self.model, self.processor, self.family = prepare_model(model, processor, cfg, self.device)
        self.train_dataset = train_dataset
        for key in ("prompt", "completion"):  # these columns only: no image is opened
            for index, value in enumerate(column(train_dataset, key)):
                if not value:
                    raise ValueError(f"train_dataset row {index}: missing field {key!r}")
        check_targets_fit(self.family.template, column(train_dataset, "completion"))
        self.opt = Optimization(self.model, cfg, total_updates=cfg.max_steps,
                                micro_batches_per_update=cfg.batch_size // size // cfg.micro_batch_size,
                                micro_batch_size=cfg.micro_batch_size)
        self.step = 0
        self.guard = RunGuard(cfg, self.device, "sft")

    def _rows_for_step(self, step: int):
        return rows_for_step(self.train_dataset, step, self.config.batch_size, self.config.seed, "batch_size")

    def encode(self, rows: list[dict], row_indices: list[int]):
        """Prompt inputs, right-padded target ids [N, T] with their mask (on this process's device), and
        how many targets were cut to max_completion_length."""
        cfg = self.config
        prompts = encode_prompts(self.family, rows, row_indices, cfg.max_prompt_length).to(self.device)
        if self.opt.zero_stage == 3:  # a process without images would skip the tower's collective forward
            check_images_on_every_rank(prompts.images_per_prompt, row_indices, self.device)
        ids, mask, cut = encode_targets(self.family, rows, row_indices, cfg.max_completion_length)
        return prompts, ids.to(self.device), mask.to(self.device), cut

    def loss(self, prompts, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of the target tokens."""
        logprobs = plain_logprobs(self.family, self.opt.module, prompts, ids, mask)  # [N, T]
        return -(logprobs * mask).sum()

    def train(self) -> list[dict]:
        """Run to max_steps; a stop signal ends it after a step with a checkpoint (raises Preempted)."""
        with self.guard:
            return self._train()

    def _train(self) -> list[dict]:
        cfg = self.config
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        if resume:
            state = load_checkpoint(resume, self.opt)
            self.step = state["step"]
            self.guard.load_state(state)
        start_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
        main = is_main_process()
        log = MetricsLog(cfg, self.step if resume else None, "sft", PROGRESS_SHOWN) if main else None
        history = []
        _, size = world()
        self.opt.train(True)
        while self.step < cfg.max_steps:
            t0 = time.time()
            rows, indices = self._rows_for_step(self.step)
            # Token mean over the whole optimizer step (all processes), whatever the micro-batching:
            # the target token count is known before any forward, so each backward is weighted now.
            micro_batches = [self.encode(rows[i : i + cfg.micro_batch_size], indices[i : i + cfg.micro_batch_size])
                             for i in range(0, len(rows), cfg.micro_batch_size)]
            local = torch.tensor([float(sum(int(mask.sum()) for _, _, mask, _ in micro_batches)),
                                  float(sum(cut for *_, cut in micro_batches))], device=self.device)
            tokens, cut = all_reduce_sum(local).tolist()  # target tokens and cut targets of the whole step
            nll_total = 0.0
            for prompts, ids, mask, _ in micro_batches:
                nll = self.loss(prompts, ids, mask)
                # DeepSpeed averages gradients over processes; the factor `size` turns that into the sum.
                self.opt.backward(nll * (size / tokens))
                nll_total += nll.item()
            grad_norm = self.opt.step()
            self.step += 1
            step_time = time.time() - t0
            nll_total = float(all_reduce_sum(torch.tensor(nll_total, device=self.device)))
            record = {"step": self.step, "loss": nll_total / tokens, "grad_norm": grad_norm, "lr": self.opt.lr,
                      "tokens": int(tokens), "truncated_frac": cut / cfg.batch_size, "step_time": step_time,
                      "tokens_per_sec": tokens / step_time}
            record.update(self.guard.end_step(self.step, self.opt, {"loss": record["loss"], "grad_norm": grad_norm},
                                              rows, indices))
            history.append(record)
            if main:
                log.write(record)
            saved = None
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.max_steps:
                saved = self.save(self.step)
            self.guard.finish_step(self.step, saved, self.save)
        if main:
            log.close()
        return history

    def save(self, step: int) -> str:
        return save_checkpoint(self.config.output_dir, step, self.opt, self.processor,
                               {"config": asdict(self.config), **self.guard.state()}, self.config.save_total_limit)
