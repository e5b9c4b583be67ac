"""The 2025-26 objective variants in grpo/objective.py against an independent float64 reference.

The reference below computes every token's policy term and its analytic derivative in d(logp) one
token at a time with plain Python floats, for each policy term (clip with delta / dual clip, CISPO,
SAPO), each importance-sampling level (token; sequence = GSPO, whose ratio couples the tokens of a
completion) and each aggregation, with an optional token mask. Then the properties a user relies
on: at ratio 1 every variant has the vanilla policy gradient, GSPO on one-token completions is
token-level, micro-batches on several processes make the whole batch's update, and the 80/20
entropy threshold and RLOO baseline are what their papers define.
"""

import math

import numpy as np
import pytest
import torch

from test_objective import aggregation_weight  # the aggregation's d loss / d (token term), shared reference

from grpo.objective import (
    check_objective, group_advantages, grpo_loss, high_entropy_mask, micro_batch_weights, zero_spread_groups,
)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
POLICY_LOSSES = ["clip", "cispo", "sapo"]
LENGTHS = [7, 3, 5, 1, 6, 4]  # ragged completions; L = 7
ADVANTAGES = [1.3, -0.7, 0.0, -1.9, 0.4, 2.2]  # both signs and a zero
# GSPO's sequence ratios sit near 1 (a mean of log-ratios): its paper's clip range makes them clip.
EPSILONS = {"token": (0.2, 0.28), "sequence": (3e-4, 4e-4)}


def make_batch(seed=0, lengths=LENGTHS):
    """Float64 log-probs whose ratios spread over roughly [0.2, 5], far outside any clip range."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    logprobs = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    old = logprobs - (torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1) * 1.6
    ref = logprobs + (torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1)
    mask = torch.tensor([[t < n for t in range(L)] for n in lengths])
    token_mask = torch.rand(B, L, generator=g) < 0.6
    adv = torch.tensor(ADVANTAGES[:B], dtype=torch.float64)
    return logprobs, old, ref, adv, mask, token_mask


def reference(logprobs, old, adv, mask, *, ref=None, beta=0.0, eps_low=0.2, eps_high=None, loss_type="grpo",
              policy_loss="clip", level="token", delta=None, dual_clip=None, cispo_max_ratio=5.0, tau_pos=1.0,
              tau_neg=1.05, token_mask=None, max_completion_length=None, num_items_in_batch=None):
    """Returns (loss, d loss / d logprobs as nested lists, stats dict)."""
    eps_high = eps_low if eps_high is None else eps_high
    x, o, m, a_ = logprobs.tolist(), old.tolist(), mask.tolist(), adv.tolist()
    keep = token_mask.tolist() if token_mask is not None else [[True] * len(row) for row in m]
    r_ = ref.tolist() if ref is not None else None
    B, L = len(x), len(x[0])
    counts = [sum(1 for t in range(L) if m[i][t]) for i in range(B)]
    total = sum(counts)
    loss, kl_sum, clipped, capped = 0.0, 0.0, 0, 0
    grad = [[0.0] * L for _ in range(B)]
    for i in range(B):
        A = a_[i]
        w = aggregation_weight(loss_type, i, counts, L, max_completion_length, num_items_in_batch)
        tokens = [t for t in range(L) if m[i][t]]
        if level == "sequence":
            s = math.exp(sum(x[i][t] - o[i][t] for t in tokens) / max(len(tokens), 1))
        for t in tokens:
            r = s if level == "sequence" else math.exp(x[i][t] - o[i][t])
            d_ratio, d_direct = 0.0, 0.0  # d term / d r, and d term / d logp_t not through r
            if policy_loss == "clip":
                unclipped = r if delta is None else min(r, delta)
                c = min(max(r, 1 - eps_low), 1 + eps_high)
                if unclipped * A <= c * A:
                    term, d_ratio = -unclipped * A, (-A if delta is None or r < delta else 0.0)
                else:
                    term, d_ratio = -c * A, (-A if 1 - eps_low < r < 1 + eps_high else 0.0)
                is_clipped = (r < 1 - eps_low and A < 0) or (r > 1 + eps_high and A > 0)
                is_capped = A < 0 and delta is not None and r > delta
                if dual_clip is not None and A < 0 and r > dual_clip:
                    term, d_ratio, is_capped = -dual_clip * A, 0.0, True
            elif policy_loss == "cispo":
                weight = min(r, cispo_max_ratio)  # a constant for the gradient
                term, d_direct = -weight * A * x[i][t], -weight * A
                is_clipped, is_capped = r > cispo_max_ratio, False
            else:
                tau = tau_pos if A > 0 else tau_neg
                gate = 1.0 / (1.0 + math.exp(-tau * (r - 1)))
                term, d_ratio = -(4 / tau) * gate * A, -4 * gate * (1 - gate) * A
                is_clipped = is_capped = False
            clipped += is_clipped
            capped += is_capped
            if keep[i][t]:
                loss += w * term
                grad[i][t] += w * d_direct
                if level == "sequence":  # d s / d logp_u = s / n for every token u of the completion
                    for u in tokens:
                        grad[i][u] += w * d_ratio * s / len(tokens)
                else:
                    grad[i][t] += w * d_ratio * r
            if r_ is not None:
                d = r_[i][t] - x[i][t]
                kl_sum += math.exp(d) - d - 1
                if beta > 0:
                    loss += w * beta * (math.exp(d) - d - 1)
                    grad[i][t] += w * beta * (1 - math.exp(d))
    stats = {"kl": kl_sum / total, "clip_ratio": clipped / total, "dual_clip_ratio": capped / total}
    return loss, grad, stats


def run(logprobs, old, adv, mask, **kw):
    """grpo_loss with gradient: (loss, grad, stats as floats)."""
    x = logprobs.detach().clone().requires_grad_(True)
    loss, stats = grpo_loss(x, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.item(), grad, {k: v.item() for k, v in stats.items()}


def assert_matches(got, want):
    (loss, grad, stats), (want_loss, want_grad, want_stats) = got, want
    assert loss == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-11, atol=1e-15)
    for key, value in want_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-12, abs=0.0), key


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "token-mask"])
def test_every_policy_term_level_and_aggregation_matches_the_reference(policy_loss, level, loss_type, masked):
    logprobs, old, ref, adv, mask, token_mask = make_batch()
    eps_low, eps_high = EPSILONS[level]
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=9, num_items_in_batch=40.0)
    got = run(logprobs, old, adv, mask, ref_logprobs=ref, epsilon_low=eps_low, epsilon_high=eps_high,
              policy_loss=policy_loss, importance_sampling_level=level, cispo_max_ratio=2.5,
              token_mask=token_mask if masked else None, **kw)
    want = reference(logprobs, old, adv, mask, ref=ref, eps_low=eps_low, eps_high=eps_high, policy_loss=policy_loss,
                     level=level, cispo_max_ratio=2.5, token_mask=token_mask if masked else None, **kw)
    assert_matches(got, want)
    assert got[1][~mask].abs().max().item() == 0.0  # padding never receives gradient
    if policy_loss != "sapo":
        assert 0 < got[2]["clip_ratio"] < 1, "the batch must clip (clip) / truncate (cispo) some tokens, not all"


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_sided_clip_caps_negative_advantage_ratios_like_the_dual_clip(level, loss_type):
    logprobs, old, ref, adv, mask, _ = make_batch()  # sequence ratios 1.53 and 4.93 where A < 0
    eps_low, eps_high = EPSILONS[level]
    delta = 1.5
    kw = dict(ref_logprobs=ref, beta=0.04, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type,
              importance_sampling_level=level)
    got = run(logprobs, old, adv, mask, delta=delta, **kw)
    want = reference(logprobs, old, adv, mask, ref=ref, beta=0.04, eps_low=eps_low, eps_high=eps_high,
                     loss_type=loss_type, level=level, delta=delta)
    assert_matches(got, want)
    assert got[2]["dual_clip_ratio"] > 0, "the batch must hold negative-advantage tokens past delta"
    # Above the clip range INTELLECT-2's delta and verl's dual clip are the same cap.
    dual = run(logprobs, old, adv, mask, dual_clip=delta, **kw)
    assert dual[0] == pytest.approx(got[0], rel=1e-12)
    torch.testing.assert_close(dual[1], got[1], rtol=1e-12, atol=1e-15)
    assert dual[2] == pytest.approx(got[2], rel=1e-12)
    plain = run(logprobs, old, adv, mask, **kw)
    assert plain[0] > got[0]  # the cap only lowers terms


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("variant", [
    dict(policy_loss="clip"), dict(policy_loss="clip", epsilon_low=3e-4, epsilon_high=4e-4),
    dict(policy_loss="clip", delta=2.0, dual_clip=3.0), dict(policy_loss="cispo", cispo_max_ratio=0.5),
    dict(policy_loss="sapo"), dict(policy_loss="sapo", sapo_temperature_pos=0.3, sapo_temperature_neg=7.0),
], ids=["clip", "gspo-eps", "delta+dual", "cispo", "sapo", "sapo-temperatures"])
def test_at_ratio_one_every_variant_has_the_vanilla_policy_gradient(variant, level, loss_type):
    """With the policy equal to the old policy (one update per rollout), d loss / d logp_t is
    -A_i times the aggregation's weight, whatever the clip, gate or truncation (CISPO's weight min(1,
    0.5) is the exception that proves the rule: its cap is below 1, so its gradient is halved)."""
    logprobs, _, _, adv, mask, _ = make_batch(seed=2)
    L = logprobs.shape[1]
    _, grad, stats = run(logprobs, logprobs, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                         num_items_in_batch=33, **variant)
    scale = min(1.0, variant.get("cispo_max_ratio", 1.0))
    counts = [int(n) for n in mask.sum(1)]
    want = [[-scale * adv[i].item() * aggregation_weight(loss_type, i, counts, L, num_items_in_batch=33) if mask[i, t] else 0.0
             for t in range(L)] for i in range(len(counts))]
    torch.testing.assert_close(grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-16)
    assert stats["dual_clip_ratio"] == 0.0 and stats["clip_ratio"] == (1.0 if scale < 1 else 0.0)


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_on_one_token_completions_is_token_level(policy_loss, loss_type):
    logprobs, old, ref, adv, _, token_mask = make_batch(seed=4)
    mask = torch.zeros_like(token_mask)
    mask[:, 0] = True  # every completion one token long (then padding)
    kw = dict(ref_logprobs=ref, beta=0.04, loss_type=loss_type, policy_loss=policy_loss, cispo_max_ratio=2.0,
              token_mask=token_mask)
    token = run(logprobs, old, adv, mask, importance_sampling_level="token", **kw)
    sequence = run(logprobs, old, adv, mask, importance_sampling_level="sequence", **kw)
    assert sequence[0] == pytest.approx(token[0], rel=1e-14)
    torch.testing.assert_close(sequence[1], token[1], rtol=1e-14, atol=1e-16)
    assert sequence[2] == pytest.approx(token[2], rel=1e-14)


def test_sapo_gate_is_a_soft_clip_with_the_vanilla_gradient_at_ratio_one():
    """At rho = 1 the gate's slope is 4 * sigmoid'(0) = 1 for any temperature (the vanilla
    gradient); away from 1 it decays smoothly, faster for the larger (negative-advantage) temperature."""
    rho = torch.tensor([[1.0, 1.5, 3.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    slopes = {}
    for sign in (1.0, -1.0):
        x = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
        loss, _ = grpo_loss(x, -rho.log(), torch.tensor([sign], dtype=torch.float64), mask, policy_loss="sapo",
                            sapo_temperature_pos=1.0, sapo_temperature_neg=4.0, loss_type="bnpo")
        loss.backward()
        slopes[sign] = (-3 * x.grad[0] / rho[0] / sign).tolist()  # d term / d rho per unit advantage
    tau = {1.0: 1.0, -1.0: 4.0}
    for sign, values in slopes.items():
        gate = [1 / (1 + math.exp(-tau[sign] * (r - 1))) for r in rho[0].tolist()]
        assert values == pytest.approx([4 * g * (1 - g) for g in gate], rel=1e-12)
        assert values[0] == pytest.approx(1.0, rel=1e-15) and values[0] > values[1] > values[2] > 0
    assert slopes[-1.0][2] < slopes[1.0][2]


def test_token_mask_keeps_the_kl_and_the_denominators():
    logprobs, old, ref, adv, mask, _ = make_batch(seed=5)
    nothing = torch.zeros_like(mask)
    for loss_type in LOSS_TYPES:
        loss, grad, stats = run(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
                                token_mask=nothing)
        # No policy term left: the loss is the KL term alone, aggregated over all completion tokens.
        kl_only = reference(logprobs, old, torch.zeros_like(adv), mask, ref=ref, beta=0.04, loss_type=loss_type)
        assert loss == pytest.approx(kl_only[0], rel=1e-12)
        torch.testing.assert_close(grad, torch.tensor(kl_only[1], dtype=torch.float64), rtol=1e-12, atol=1e-16)
        full = run(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type)
        assert stats == pytest.approx(full[2], rel=1e-12)  # the stats are over the completion tokens


def test_objective_settings_are_checked_naming_the_field():
    logprobs, old, _, adv, mask, _ = make_batch()
    for kwargs, message in [
        (dict(policy_loss="ppo"), "unknown policy_loss 'ppo'; valid: clip, cispo, sapo"),
        (dict(importance_sampling_level="group"), "unknown importance_sampling_level 'group'"),
        (dict(cispo_max_ratio=0.0), "cispo_max_ratio must be > 0"),
        (dict(delta=1.2), r"delta must be > 1 \+ epsilon_high = 1.2"),
        (dict(delta=1.25, epsilon_high=0.28), r"delta must be > 1 \+ epsilon_high = 1.28"),
        (dict(delta=4.0, policy_loss="cispo"), "delta=4.0 caps the clipped surrogate"),
        (dict(dual_clip=3.0, policy_loss="sapo"), "dual_clip=3.0 caps"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_objective(**kwargs)
        with pytest.raises(ValueError, match=message):
            grpo_loss(logprobs, old, adv, mask, **kwargs)
    check_objective(delta=4.0, epsilon_high=0.28)  # INTELLECT-2's setting is accepted


# ---- how micro-batches on several processes are weighted -------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_micro_batches_on_two_processes_make_the_whole_batch_update(loss_type, policy_loss):
    """6 completions as 2 processes x 3, micro-batches of 1 and 2: the processes' weighted gradients,
    averaged as DeepSpeed averages them, equal one process's gradient on the whole batch; the logged
    loss is the whole batch's loss. (bnpo: the micro-batches' token means, weighted by their share of
    the completions: their mean when, as in the trainer, they are all the same size; as in TRL.)"""
    logprobs, old, ref, adv, mask, token_mask = make_batch(seed=6)
    kw = dict(ref_logprobs=ref, beta=0.04, loss_type=loss_type, policy_loss=policy_loss, token_mask=token_mask,
              max_completion_length=8)
    step_tokens = mask.sum()
    micro_batches = [[0], [1, 2], [3], [4, 5]]  # process 0: 0..2, process 1: 3..5
    x = logprobs.clone().requires_grad_(True)
    process_grads, logged = [torch.zeros_like(x), torch.zeros_like(x)], 0.0
    for process, index in zip([0, 0, 1, 1], micro_batches):
        loss, _ = grpo_loss(x[index], old[index], adv[index], mask[index], num_items_in_batch=step_tokens,
                            **{**kw, "ref_logprobs": ref[index], "token_mask": token_mask[index]})
        weights = micro_batch_weights(loss_type, len(index), 3, world_size=2)
        (grad,) = torch.autograd.grad(loss * weights.backward, x)
        process_grads[process] += grad
        logged += loss.item() * weights.logged
    averaged = (process_grads[0] + process_grads[1]) / 2
    if loss_type == "bnpo":  # each micro-batch's token mean, weighted by its share of the completions
        want_loss, want_grad = 0.0, torch.zeros_like(x)
        for index in micro_batches:
            part, _ = grpo_loss(x[index], old[index], adv[index], mask[index],
                                **{**kw, "ref_logprobs": ref[index], "token_mask": token_mask[index]})
            want_loss += part.item() * len(index) / 6
            want_grad += torch.autograd.grad(part * len(index) / 6, x)[0]
    else:
        whole, _ = grpo_loss(x, old, adv, mask, **kw)
        want_loss, want_grad = whole.item(), torch.autograd.grad(whole, x)[0]
    assert logged == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(averaged, want_grad, rtol=1e-12, atol=1e-16)


# ---- 80/20: high-entropy tokens -----------------------------------------------------------------


def test_high_entropy_mask_keeps_the_top_fraction_of_completion_tokens():
    g = torch.Generator().manual_seed(7)
    entropies = torch.rand(6, 9, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[t < n for t in range(9)] for n in [9, 2, 5, 1, 7, 4]])
    values = entropies[mask].numpy()
    for fraction in (0.2, 0.5, 1.0, 1e-9):
        kept = high_entropy_mask(entropies, mask, fraction)
        threshold = np.quantile(values, 1 - fraction)  # numpy's default: linear interpolation
        assert kept.tolist() == (mask & (entropies >= threshold)).tolist()
        assert not (kept & ~mask).any()
        # Distinct values: those at or past the interpolated position (1 - fraction) * (n - 1) of the sorted ones.
        assert kept.sum().item() == len(values) - math.ceil((1 - fraction) * (len(values) - 1)), fraction
    assert high_entropy_mask(entropies, mask, 1.0).tolist() == mask.tolist()
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="top_fraction must be in"):
            high_entropy_mask(entropies, mask, bad)


# ---- advantages: RLOO, zero spread -----------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others(scale):
    rewards = [1.0, 0.0, 0.5, 2.0,  0.2, 0.2, 0.9, 0.0,  1.5, 1.5, 1.5, 1.5]  # G = 4, last group all equal
    G = 4
    loo = []
    for start in range(0, len(rewards), G):
        group = rewards[start : start + G]
        loo += [r - sum(group[j] for j in range(G) if j != i) / (G - 1) for i, r in enumerate(group)]
    loo = np.array(loo)
    if scale == "group":
        std = np.repeat(np.asarray(rewards).reshape(-1, G).std(axis=1, ddof=1), G)
        loo = loo / (std + 1e-4)
    elif scale == "batch":
        loo = loo / (np.std(rewards, ddof=1) + 1e-4)
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale=scale, estimator="rloo")
    np.testing.assert_allclose(got.numpy(), loo, rtol=1e-12, atol=1e-15)
    assert got[8:].tolist() == [0.0] * 4
    grpo = group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale=scale)
    np.testing.assert_allclose(got.numpy(), grpo.numpy() * G / (G - 1), rtol=1e-12, atol=1e-15)  # the same direction
    with pytest.raises(ValueError, match="estimator must be one of"):
        group_advantages(torch.zeros(4), 2, estimator="ppo")


def test_zero_spread_groups_are_the_groups_with_all_rewards_equal_continuous_ones_included():
    rewards = torch.tensor([0.3] * 3 + [0.0, 1.0, 0.0] + [0.7, 0.7, 0.7 + 1e-6] + [1.0] * 3)
    assert zero_spread_groups(rewards, 3).tolist() == [True, False, False, True]
