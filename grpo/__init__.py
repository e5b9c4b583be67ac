"""A readable GRPO library for vision-language models (PathVLM-R1 and beyond)."""

from .evaluate import evaluate
from .objective import group_advantages, grpo_loss, kl_k3
from .sft import SFTConfig, SFTTrainer
from .trainer import GRPOConfig, Trainer

__all__ = ["GRPOConfig", "SFTConfig", "SFTTrainer", "Trainer", "evaluate", "group_advantages", "grpo_loss", "kl_k3"]
