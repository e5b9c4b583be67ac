"""The GRPO objective and its 2025-26 variants as pure tensor functions (no model, no trainer).

Notation follows the paper / DeepSeekMath (docs/objective.md has every formula and its source):
G completions per prompt, rewards r_i, group advantages A_i, ratio rho = exp(logp_theta - logp_old),
a per-token policy term (`policy_loss`: clip, cispo, sapo) plus beta * k3 KL, aggregated over tokens
by `loss_type` (grpo, bnpo, dr_grpo, dapo): every policy term combines with every aggregation.
Every function here is unit-tested against an independent float64 computation.

Shapes, in every shape comment of the library:
  B  prompts per step (on this process, or in the batch at hand)
  G  group size: completions sampled per prompt
  N  = B x G completions
  P  prompt length (padded)
  C  completion length (padded)
  L  = P + C, a whole sequence
  V  vocabulary size
  D  hidden size
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .distributed import all_gather_cat

SCALE_MODES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
POLICY_LOSSES = ("clip", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo")


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: the groups whose G rewards are all equal (whatever the value, continuous
    rewards included). They get advantage 0 and carry no policy gradient (DAPO's dynamic sampling drops them)."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    return (grouped == grouped[:, :1]).all(dim=1)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, estimator: str = "grpo"
) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    `rewards` is 1-D, each group's `group_size` entries contiguous. `estimator` picks the baseline:
    "grpo" subtracts the group mean; "rloo" (REINFORCE leave-one-out) subtracts the mean of the
    *other* G - 1 rewards, r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_j r_j). `scale` picks
    the divisor: "group" (that group's std), "batch" (std of all rewards, Dr. GRPO / TRL's "batch"),
    "none" (no division; RLOO's own form). std is Bessel-corrected. A group whose rewards are all
    equal gets advantage exactly 0.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
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
    grouped = rewards.view(-1, group_size)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        centred = centred * (group_size / (group_size - 1))
    # The float mean of equal values need not equal them (six 0.3s in float32), and the tiny residue
    # divided by std + eps would be a spurious advantage: equal groups are zeroed explicitly.
    centred = centred.masked_fill(zero_spread_groups(rewards, group_size)[:, None], 0.0)
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


@dataclass(frozen=True)
class Objective:
    """The per-token objective's settings, with their defaults: the one place they are defined
    (GRPOConfig's fields of the same names take these defaults; `grpo_loss` documents each).
    Settings that make no sense are refused at construction, naming the field."""

    loss_type: str = "grpo"
    policy_loss: str = "clip"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None = epsilon_low
    delta: float | None = None
    dual_clip: float | None = None
    cispo_max_ratio: float = 5.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self):
        for field, value, valid in (("loss_type", self.loss_type, LOSS_TYPES), ("policy_loss", self.policy_loss, POLICY_LOSSES),
                                    ("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)):
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")
        upper = 1.0 + self.clip_high
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl uses 3), got {self.dual_clip}")
        if self.delta is not None and self.delta <= upper:
            raise ValueError(f"delta must be > 1 + epsilon_high = {upper:g} (INTELLECT-2 uses 4), got {self.delta}: "
                             f"it caps the ratio of the unclipped branch, above the clip range")
        for field, value in (("delta", self.delta), ("dual_clip", self.dual_clip)):
            if value is not None and self.policy_loss != "clip":
                raise ValueError(f"{field}={value} caps the clipped surrogate and applies to policy_loss='clip' only, "
                                 f"not {self.policy_loss!r}")
        if self.cispo_max_ratio <= 0:
            raise ValueError(f"cispo_max_ratio must be > 0 (MiniMax-M1 uses about 5), got {self.cispo_max_ratio}")
        for field, value in (("sapo_temperature_pos", self.sapo_temperature_pos),
                             ("sapo_temperature_neg", self.sapo_temperature_neg)):
            if value <= 0:
                raise ValueError(f"{field} must be > 0, got {value}")

    @property
    def clip_high(self) -> float:
        """The upper clip's epsilon: epsilon_high, or epsilon_low when it is None."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


def check_objective(**settings) -> Objective:
    """Refuse settings of the objective that make no sense, naming the field (GRPOConfig and grpo_loss
    both call it); returns them as an `Objective`."""
    return Objective(**settings)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    **settings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy term plus optional k3 KL penalty, aggregated over tokens.

    `settings`: the `Objective` fields (loss_type, policy_loss, importance_sampling_level, epsilon_low,
    epsilon_high, delta, dual_clip, cispo_max_ratio, sapo_temperature_pos, sapo_temperature_neg).
    Shapes: logprobs, old_logprobs, completion_mask, ref_logprobs, token_mask: [N, C]; advantages: [N].
    The ratio: `importance_sampling_level` "token" rho_t = exp(logp_t - logp_old_t); "sequence" (GSPO)
    s_i = exp(masked mean over t of (logp - logp_old)), one per completion, used for every token of it
    (its gradient reaches every token through the mean). Per token, with r that ratio:
      clip  -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A); `delta` (INTELLECT-2's two-sided clip) caps
            the first r at delta; `dual_clip` c (verl): a token with A < 0 and r > c costs -c*A. For
            c > 1 + eps_high the two are the same cap, reached from two papers' names.
      cispo -sg(min(r, cispo_max_ratio)) * A * logp (MiniMax-M1): the weight carries no gradient, so
            a truncated token still gets its (weighted) policy gradient.
      sapo  -(4/tau) * sigmoid(tau * (r - 1)) * A, tau = sapo_temperature_pos if A > 0 else _neg:
            a soft gate in place of the hard clip; at r = 1 its gradient is the vanilla one.
    `token_mask` (e.g. `high_entropy_mask`) keeps the policy term on its tokens only; the KL term and
    the aggregation's denominators still use completion_mask (as TRL does). Aggregation, `loss_type`:
      grpo    mean over sequences of (masked token sum / that sequence's token count)  (paper)
      bnpo    masked sum / masked count of this batch
      dr_grpo masked sum / (N * max_completion_length)  (max_completion_length defaults to C)
      dapo    masked sum / num_items_in_batch  (completion tokens of the whole optimizer step;
              defaults to this batch's masked count)
    TRL's loss_type="cispo" is policy_loss="cispo", loss_type="dapo"; TRL's "sapo" is
    policy_loss="sapo", loss_type="grpo"; TRL's importance_sampling_level is the same setting.
    With one update per rollout old_logprobs == logprobs.detach(): r == 1, the clip and sapo loss
    values are ~0 (or beta*KL), but the gradient is the policy gradient. That is expected.

    Returns (loss, stats), stats over completion_mask: `kl` (masked mean of k3; 0 without a
    reference), `clip_ratio` (fraction of tokens whose ratio is clipped: clip's clipped branch active;
    cispo's weight truncated, either sign of A; 0 for sapo) and `dual_clip_ratio` (fraction whose
    negative-advantage term is capped by dual_clip or delta; 0 when both are off).
    """
    objective = check_objective(**settings)
    loss_type, policy_loss = objective.loss_type, objective.policy_loss
    delta, dual_clip = objective.delta, objective.dual_clip
    epsilon_low, epsilon_high = objective.epsilon_low, objective.clip_high
    mask = completion_mask.to(logprobs.dtype)  # [N, C]
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [N, 1]

    log_ratio = logprobs - old_logprobs  # [N, C]
    if objective.importance_sampling_level == "sequence":
        sequence = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [N, 1]
        log_ratio = sequence.expand_as(logprobs)
    ratio = torch.exp(log_ratio)  # [N, C]
    no_token = torch.zeros_like(mask, dtype=torch.bool)
    capped = no_token
    if policy_loss == "clip":
        clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        unclipped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped_ratio * adv, clipped_ratio * adv)  # [N, C]
        clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
        if delta is not None:
            capped = (adv < 0) & (ratio > delta)
        if dual_clip is not None:
            dual_capped = (adv < 0) & (ratio > dual_clip)  # [N, C]
            per_token = torch.where(dual_capped, -dual_clip * adv, per_token)
            capped = capped | dual_capped
    elif policy_loss == "cispo":
        weight = torch.clamp(ratio, max=objective.cispo_max_ratio).detach()
        per_token = -weight * adv * logprobs
        clipped = ratio > objective.cispo_max_ratio
    else:  # sapo
        tau = torch.where(adv > 0, adv.new_tensor(objective.sapo_temperature_pos),
                          adv.new_tensor(objective.sapo_temperature_neg))  # [N, 1]
        per_token = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv
        clipped = no_token
    if token_mask is not None:
        per_token = per_token * token_mask.to(per_token.dtype)

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
        clip_ratio = (clipped.to(mask.dtype) * mask).sum() / token_count
        dual_clip_ratio = (capped.to(mask.dtype) * mask).sum() / token_count
    return loss, {"kl": mean_kl.detach(), "clip_ratio": clip_ratio, "dual_clip_ratio": dual_clip_ratio}


class MicroBatchWeights(NamedTuple):
    backward: float  # multiplies the micro-batch's loss before its backward
    logged: float  # the micro-batch loss's share of the step's logged loss (summed over micro-batches and processes)
    stats: float  # its share of the step's logged kl / clip ratios (summed the same way)


def micro_batch_weights(loss_type: str, micro_completions: int, process_completions: int,
                        world_size: int) -> MicroBatchWeights:
    """How one micro-batch's `grpo_loss` is weighted, under every aggregation and process count.

    The one place that knows it. Gradients of several processes are averaged (DeepSpeed), so the
    update equals one process's update on the whole step's batch when: grpo, bnpo and dr_grpo
    losses are weighted by the micro-batch's share of its process's completions (grpo and dr_grpo
    are then exactly the whole batch's loss; bnpo's token mean is taken per micro-batch, as in TRL,
    so it is the mean of the micro-batches' token means, weighted by their sizes); dapo's losses are already divided by the
    step's token count over all processes, so they add up, and are scaled by the world size to undo
    the averaging. The logged step loss is the sum over micro-batches and processes of
    `logged * loss`; the logged stats likewise with `stats`.
    """
    share = micro_completions / process_completions
    if loss_type == "dapo":
        return MicroBatchWeights(backward=float(world_size), logged=1.0, stats=share / world_size)
    return MicroBatchWeights(backward=share, logged=share / world_size, stats=share / world_size)


def high_entropy_mask(entropies: torch.Tensor, completion_mask: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """[N, C] bool: the completion tokens whose entropy is in the top `top_fraction` of the step's
    completion tokens ("Beyond the 80/20 rule", Wang et al. 2025: 0.2).

    The threshold is the (1 - top_fraction) quantile (linear interpolation, numpy's default) of
    the masked entropies of every process (collective: every process calls it with its own tokens),
    so the rule is the same however the step is split; tokens at or above it are kept. 1.0 keeps all.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    mask = completion_mask.bool()
    values = all_gather_cat(entropies[mask])  # the step's completion tokens, all processes
    if values.numel() == 0:
        return mask
    # torch.quantile refuses inputs above 2**24 elements: the same interpolation on the sorted values.
    values, _ = torch.sort(values)
    position = (1.0 - top_fraction) * (values.numel() - 1)
    low = int(position)
    high = min(low + 1, values.numel() - 1)
    threshold = values[low] + (values[high] - values[low]) * (position - low)
    return mask & (entropies >= threshold)
