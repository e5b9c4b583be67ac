"""Supervised fine-tuning (the paper's knowledge-injection stage): loss on the assistant tokens only.

Rows carry `prompt` (chat messages), `image`/`images`, and `completion`: the assistant text
(e.g. "<think>...</think><answer>B) ...</answer>"); the end-of-turn token is appended and trained on.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from .config import ConfigMixin
from .rollout import completion_logprobs, encode_prompts
from .training import (
    JsonlLog, Progress, freeze_vision_tower, load_checkpoint, load_model, load_processor, make_optimizer,
    resolve_checkpoint, save_checkpoint, seed_everything,
)


@dataclass
class SFTConfig(ConfigMixin):
    """SFT hyper-parameters."""

    output_dir: str = "runs/sft"
    batch_size: int = 8  # rows per optimizer step
    micro_batch_size: int = 8  # rows per forward/backward; must divide batch_size
    max_prompt_length: int = 1024
    max_completion_length: int = 1024  # longer targets are cut (and counted in metrics)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_scheduler: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0
    max_steps: int = 1000
    seed: int = 0
    freeze_vision_tower: bool = True
    dtype: str = "auto"
    save_steps: int = 500  # 0 = only at the end
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size}")


def encode_targets(tokenizer, texts: list[str], end_token: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target ids [N, T] and their mask; the end-of-turn token closes each target."""
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1] + [end_id] for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


class SFTTrainer:
    """Next-token cross-entropy on the assistant completion, prompt tokens masked out."""

    def __init__(self, model, processor, train_dataset, config: SFTConfig | None = None):
        self.config = config or SFTConfig()
        cfg = self.config
        seed_everything(cfg.seed)
        self.model = load_model(model, cfg.dtype)
        self.processor = load_processor(processor, model if isinstance(model, (str, os.PathLike)) else None)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.train_dataset = train_dataset
        for index, row in enumerate(train_dataset):
            for key in ("prompt", "completion"):
                if not row.get(key):
                    raise ValueError(f"train_dataset row {index}: missing field {key!r}")
        if cfg.freeze_vision_tower:
            freeze_vision_tower(self.model)
        self.optimizer, self.scheduler = make_optimizer(
            self.model, cfg.learning_rate, cfg.weight_decay, cfg.adam_betas, cfg.warmup_steps, cfg.lr_scheduler, cfg.max_steps)
        self.step = 0

    def _rows_for_step(self, step: int):
        n, per_step = len(self.train_dataset), self.config.batch_size
        indices = []
        for k in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(k, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
            indices.append(int(order[offset]))
        return [self.train_dataset[i] for i in indices], indices

    def loss(self, rows: list[dict], row_indices: list[int]) -> tuple[torch.Tensor, int]:
        """Summed negative log-likelihood of the completion tokens and their count."""
        cfg = self.config
        device = next(self.model.parameters()).device
        prompts = encode_prompts(self.processor, rows, row_indices, cfg.max_prompt_length).to(device)
        ids, mask = encode_targets(self.tokenizer, [row["completion"] for row in rows], "<|im_end|>", cfg.max_completion_length)
        logprobs = completion_logprobs(self.model, prompts, ids.to(device), mask.to(device))  # [N, T]
        return -(logprobs * mask.to(device)).sum(), int(mask.sum())

    def train(self) -> list[dict]:
        cfg = self.config
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        if resume:
            self.step = load_checkpoint(resume, self.model, self.optimizer, self.scheduler)["step"]
        os.makedirs(cfg.output_dir, exist_ok=True)
        log = JsonlLog(os.path.join(cfg.output_dir, "metrics.jsonl"), self.step if resume else None)
        progress = Progress(cfg.max_steps, self.step, "sft")
        history = []
        self.model.train()
        while self.step < cfg.max_steps:
            t0 = time.time()
            rows, indices = self._rows_for_step(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            parts = []
            for start in range(0, len(rows), cfg.micro_batch_size):
                parts.append(self.loss(rows[start : start + cfg.micro_batch_size], indices[start : start + cfg.micro_batch_size]))
            tokens = sum(count for _, count in parts)
            # Token mean over the whole optimizer step, whatever the micro-batching.
            for nll, _ in parts:
                (nll / tokens).backward()
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            step_time = time.time() - t0
            record = {"step": self.step, "loss": sum(float(nll) for nll, _ in parts) / tokens, "grad_norm": float(grad_norm),
                      "lr": self.scheduler.get_last_lr()[0], "tokens": tokens, "step_time": step_time,
                      "tokens_per_sec": tokens / step_time}
            log.write(record)
            history.append(record)
            progress.update(self.step, loss=record["loss"])
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.max_steps:
                save_checkpoint(cfg.output_dir, self.step, self.model, self.processor, self.optimizer, self.scheduler,
                                {"config": asdict(cfg)}, cfg.save_total_limit)
        return history
