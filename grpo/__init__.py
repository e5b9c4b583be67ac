"""A readable GRPO library for vision-language models (PathVLM-R1 and beyond)."""

from .evaluate import evaluate
from .logprobs import completion_logprobs
from .loading import merge_lora
from .objective import group_advantages, grpo_loss, high_entropy_mask, kl_k3
from .sampling import SamplingParams
from .sft import SFTConfig, SFTTrainer
from .trainer import GRPOConfig, Trainer

__all__ = ["GRPOConfig", "SFTConfig", "SFTTrainer", "SamplingParams", "Trainer", "completion_logprobs", "evaluate",
           "group_advantages", "grpo_loss", "high_entropy_mask", "kl_k3", "merge_lora"]
