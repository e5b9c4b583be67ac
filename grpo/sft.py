"""Supervised fine-tuning (the paper's knowledge-injection stage): loss on the assistant tokens only.

Rows carry `prompt` (chat messages), `image`/`images`, and `completion`: the assistant text
(e.g. "<think>...</think><answer>B) ...</answer>"); the end-of-turn token is appended and trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .distributed import Optimization, all_reduce_sum, check_images_on_every_rank, world
from .logprobs import plain_logprobs
from .prompts import column, encode_prompts
from .run import BaseTrainer, TrainingConfig
from .templates import check_targets_fit


@dataclass
class SFTConfig(TrainingConfig):
    """SFT hyper-parameters, beside every run's (grpo/run.py's TrainingConfig)."""

    output_dir: str = "runs/sft"  # metrics.jsonl and checkpoints go here; the GRPO stage may start from it
    batch_size: int = 8  # rows per optimizer step, over all processes
    micro_batch_size: int = 8  # rows per forward/backward on one process; must divide batch_size / processes
    learning_rate: float = 1e-5  # peak learning rate after warmup; supervised targets take a larger one than RL
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decay rates (its usual ones for supervised loss)
    max_steps: int = 1000  # optimizer steps: the run ends after this many

    def __post_init__(self):
        super().__post_init__()
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size}")

    def micro_batches(self, processes: int) -> int:
        if self.batch_size % processes or (self.batch_size // processes) % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must split into {processes} processes x whole micro-batches of "
                             f"micro_batch_size={self.micro_batch_size}")
        return self.batch_size // processes // self.micro_batch_size


def encode_targets(family, rows: list[dict], row_indices: list[int], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded target ids [B, C], their mask, and how many targets were cut to fit `max_length`.

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


class SFTTrainer(BaseTrainer):
    """Next-token cross-entropy on the assistant completion, prompt tokens masked out."""

    label = "sft"
    rows_per_step = "batch_size"
    progress_shown = PROGRESS_SHOWN

    def __init__(self, model, processor, train_dataset, config: SFTConfig | None = None):
        super().__init__(model, processor, config or SFTConfig())
        cfg = self.config
        self.train_dataset = train_dataset
        for key in ("prompt", "completion"):  # these columns only: no image is opened
            for index, value in enumerate(column(train_dataset, key)):
                if not value:
                    raise ValueError(f"train_dataset row {index}: missing field {key!r}")
        check_targets_fit(self.family.template, column(train_dataset, "completion"))
        self.opt = Optimization(self.model, cfg, total_updates=cfg.max_steps,
                                micro_batches_per_update=cfg.micro_batches(world()[1]),
                                micro_batch_size=cfg.micro_batch_size)

    def encode(self, rows: list[dict], row_indices: list[int]):
        """Prompt inputs, right-padded target ids [B, C] with their mask (on this process's device), and
        how many targets were cut to max_completion_length."""
        cfg = self.config
        prompts = encode_prompts(self.family, rows, row_indices, cfg.max_prompt_length).to(self.device)
        if self.opt.zero_stage == 3:  # a process without images would skip the tower's collective forward
            check_images_on_every_rank(prompts.images_per_prompt, row_indices, self.device)
        ids, mask, cut = encode_targets(self.family, rows, row_indices, cfg.max_completion_length)
        return prompts, ids.to(self.device), mask.to(self.device), cut

    def loss(self, prompts, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of the target tokens."""
        logprobs = plain_logprobs(self.family, self.opt.module, prompts, ids, mask)  # [B, C]
        return -(logprobs * mask).sum()

    def train_step(self) -> tuple[dict, list[dict]]:
        """One optimizer step on `batch_size` rows; returns its metrics record (SFT logs no completions)."""
        cfg = self.config
        _, size = world()
        self.opt.train(True)
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
        return record, []
