"""The GRPO objective as pure tensor functions (no model, no trainer).

Notation follows the paper / DeepSeekMath: G completions per prompt, rewards r_i, group-normalised
advantages A_i, ratio rho = exp(logp_theta - logp_old), clipped surrogate plus beta * k3 KL.
Every function here is unit-tested against an independent float64 computation.
"""

from __future__ import annotations

import torch

SCALE_MODES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    `rewards` is 1-D, each group's `group_size` entries contiguous. The group mean is always
    subtracted; `scale` picks the divisor: "group" (that group's std), "batch" (std of all rewards,
    Dr. GRPO / TRL's "batch"), "none" (no division). std is Bessel-corrected. A group whose rewards
    are all equal gets advantage exactly 0.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be at least 2 (got {group_size}, for {rewards.numel()} rewards): "
            f"GRPO needs a group to compare against"
        )
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length that is a multiple of group_size: "
            f"got {rewards.numel()} rewards and group_size {group_size}"
        )
    grouped = rewards.view(-1, group_size)  # [num_prompts, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    # The float mean of equal values need not equal them (six 0.3s in float32), and the tiny residue
    # divided by std + eps would be a spurious advantage: equal groups are zeroed explicitly.
    centred = centred.masked_fill((grouped == grouped[:, :1]).all(dim=1, keepdim=True), 0.0)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True)
    elif scale == "batch":
        std = rewards.std()
    else:
        return centred.reshape(-1)
    return (centred / (std + eps)).reshape(-1)  # an all-equal group: 0 / (0 + eps) = 0, never NaN


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss with optional k3 KL penalty.

    Shapes: logprobs, old_logprobs, completion_mask, ref_logprobs: [B, L]; advantages: [B].
    Per token: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*k3, aggregated by `loss_type`:
      grpo    mean over sequences of (masked token sum / that sequence's token count)  (paper)
      bnpo    masked sum / masked count of this batch
      dr_grpo masked sum / (B * max_completion_length)  (max_completion_length defaults to L)
      dapo    masked sum / num_items_in_batch  (completion tokens of the whole optimizer step;
              defaults to this batch's masked count)
    `dual_clip` (c > 1, verl's dual-clip, typically 3): a token with A < 0 whose ratio ran past c
    has its policy term capped at -c*A (no gradient), so one stale token cannot dominate the update.
    With one update per rollout old_logprobs == logprobs.detach(): rho == 1 and the loss value is
    ~0 (or beta*KL), but its gradient is the policy gradient. That is expected.

    Returns (loss, stats) where stats holds `kl` (masked mean of k3; 0 without a reference),
    `clip_ratio` (masked fraction of tokens whose clipped branch is active) and `dual_clip_ratio`
    (masked fraction capped by the dual clip; 0 when it is off).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (verl uses 3), got {dual_clip}")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    mask = completion_mask.to(logprobs.dtype)  # [B, L]
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]

    ratio = torch.exp(logprobs - old_logprobs)  # [B, L]
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [B, L]
    if dual_clip is not None:
        dual_capped = (adv < 0) & (ratio > dual_clip)  # [B, L]
        per_token = torch.where(dual_capped, -dual_clip * adv, per_token)

    token_count = mask.sum().clamp(min=1.0)
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs)
        mean_kl = (kl * mask).sum() / token_count
        if beta > 0:
            per_token = per_token + beta * kl
    else:
        mean_kl = logprobs.new_zeros(())

    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / token_count
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else logprobs.shape[1]
        loss = masked.sum() / (logprobs.shape[0] * length)
    else:  # dapo
        denom = token_count if num_items_in_batch is None else num_items_in_batch
        loss = masked.sum() / denom

    with torch.no_grad():
        clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
        clip_ratio = (clipped.to(mask.dtype) * mask).sum() / token_count
        dual_clip_ratio = ((dual_capped.to(mask.dtype) * mask).sum() / token_count if dual_clip is not None
                           else logprobs.new_zeros(()))
    return loss, {"kl": mean_kl.detach(), "clip_ratio": clip_ratio, "dual_clip_ratio": dual_clip_ratio}
