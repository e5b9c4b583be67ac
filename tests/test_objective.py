"""grpo/objective.py against an independent float64 reference written with plain Python loops.

The reference computes each token's loss term and its analytic derivative in d(logp) one token at a
time, so a vectorisation or masking slip in the module shows up as a value or gradient mismatch.
"""

import math

import numpy as np
import pytest
import torch

from grpo.objective import group_advantages, grpo_loss, kl_k3

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LENGTHS = [7, 3, 5, 1, 6, 4]  # ragged completions; L = 7
ADVANTAGES = [1.3, -0.7, 0.0, -1.9, 0.4, 2.2]  # both signs and a zero


def make_batch(seed=0, lengths=LENGTHS):
    """Float64 log-probs whose ratios spread over roughly [0.2, 5], far outside any clip range."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    logprobs = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    log_ratio = (torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1) * 1.6
    old = logprobs - log_ratio
    ref = logprobs + (torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1)
    mask = torch.tensor([[t < n for t in range(L)] for n in lengths])
    adv = torch.tensor(ADVANTAGES[:B], dtype=torch.float64)
    return logprobs, old, ref, adv, mask


def aggregation_weight(loss_type, i, counts, L, max_completion_length=None, num_items_in_batch=None):
    """d loss / d (token term) for a masked token of sequence i (`counts`: each sequence's tokens)."""
    B, total = len(counts), sum(counts)
    if loss_type == "grpo":
        return 1.0 / (B * max(counts[i], 1))
    if loss_type == "bnpo":
        return 1.0 / total
    if loss_type == "dr_grpo":
        return 1.0 / (B * (max_completion_length or L))
    if loss_type == "dapo":
        return 1.0 / (num_items_in_batch if num_items_in_batch is not None else total)
    raise AssertionError(loss_type)


def reference(logprobs, old, adv, mask, ref=None, beta=0.0, eps_low=0.2, eps_high=None, loss_type="grpo",
              max_completion_length=None, num_items_in_batch=None, dual_clip=None):
    """Returns (loss, d loss / d logprobs as nested lists, kl, clip_ratio, low_clips, high_clips, dual_clips)."""
    eps_high = eps_low if eps_high is None else eps_high
    x, o, m = logprobs.tolist(), old.tolist(), mask.tolist()
    r_ = ref.tolist() if ref is not None else None
    a_ = adv.tolist()
    B, L = len(x), len(x[0])
    counts = [sum(1 for t in range(L) if m[i][t]) for i in range(B)]
    total = sum(counts)

    def weight(i):
        return aggregation_weight(loss_type, i, counts, L, max_completion_length, num_items_in_batch)

    loss, kl_sum, low, high, dual = 0.0, 0.0, 0, 0, 0
    grad = [[0.0] * L for _ in range(B)]
    for i in range(B):
        A = a_[i]
        for t in range(L):
            if not m[i][t]:
                continue
            rho = math.exp(x[i][t] - o[i][t])
            clipped_rho = min(max(rho, 1 - eps_low), 1 + eps_high)
            unclipped, clipped = rho * A, clipped_rho * A
            term = -min(unclipped, clipped)
            # The clipped branch is the minimum (and flat in logp) only past the bound on A's side.
            is_low = rho < 1 - eps_low and A < 0
            is_high = rho > 1 + eps_high and A > 0
            low += is_low
            high += is_high
            dterm = 0.0 if (is_low or is_high) else -A * rho
            if dual_clip is not None and A < 0 and term > -dual_clip * A:  # the cap binds: flat in logp
                term, dterm = -dual_clip * A, 0.0
                dual += 1
            if r_ is not None:
                d = r_[i][t] - x[i][t]
                k3 = math.exp(d) - d - 1
                kl_sum += k3
                if beta > 0:
                    term += beta * k3
                    dterm += beta * (1 - math.exp(d))
            loss += weight(i) * term
            grad[i][t] = weight(i) * dterm
    return loss, grad, kl_sum / total, (low + high) / total, low, high, dual


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_value_gradient_and_stats_match_reference(loss_type, beta, eps_high):
    logprobs, old, ref, adv, mask = make_batch()
    logprobs.requires_grad_(True)
    ref_arg = ref if beta > 0 else None
    loss, stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs=ref_arg, beta=beta, epsilon_low=0.2,
                            epsilon_high=eps_high, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, logprobs)
    want_loss, want_grad, want_kl, want_clip, low, high, _ = reference(
        logprobs.detach(), old, adv, mask, ref_arg, beta, 0.2, eps_high, loss_type)
    assert low > 0 and high > 0, "the batch must clip in both directions"
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert grad[~mask].abs().max().item() == 0.0  # padding never receives gradient
    assert stats["clip_ratio"].item() == pytest.approx(want_clip, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(want_kl if beta > 0 else 0.0, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dual_clip_caps_negative_advantage_tokens_with_runaway_ratios(loss_type):
    logprobs, old, ref, adv, mask = make_batch()
    logprobs.requires_grad_(True)
    loss, stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    want_loss, want_grad, _, want_clip, _, _, dual = reference(logprobs.detach(), old, adv, mask, ref, 0.04,
                                                               loss_type=loss_type, dual_clip=3.0)
    total = int(mask.sum())
    assert dual > 0, "the batch must hold negative-advantage tokens with ratio > 3"
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert stats["dual_clip_ratio"].item() == pytest.approx(dual / total, rel=1e-12)
    assert stats["clip_ratio"].item() == pytest.approx(want_clip, rel=1e-12)
    plain, plain_stats = grpo_loss(logprobs.detach(), old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type)
    assert plain.item() > loss.item() and plain_stats["dual_clip_ratio"].item() == 0.0  # the cap only lowers terms
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        grpo_loss(logprobs, old, adv, mask, dual_clip=1.0)


def test_asymmetric_clip_changes_what_clips():
    # rho = 1.25 sits between 1 + 0.2 and 1 + 0.28: clipped (no gradient) only under the symmetric range.
    rho = torch.tensor([[1.25, 1.25, 0.75]], dtype=torch.float64)
    old = -rho.log()
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for eps_high, clipped_tokens in ((None, 2), (0.28, 0)):
        x = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
        loss, stats = grpo_loss(x, old, adv, mask, epsilon_high=eps_high)
        loss.backward()
        assert stats["clip_ratio"].item() == pytest.approx(clipped_tokens / 3)
        want_loss, want_grad, *_ = reference(x.detach(), old, adv, mask, eps_high=eps_high)
        assert loss.item() == pytest.approx(want_loss, rel=1e-12)
        assert x.grad[0].tolist() == pytest.approx(want_grad[0], rel=1e-12)
    assert want_grad[0] == pytest.approx([-1.25 / 3, -1.25 / 3, -0.75 / 3])  # rho < 1 - eps with A > 0 is not clipped


def test_kl_is_reported_with_a_reference_even_when_beta_is_zero():
    logprobs, old, ref, adv, mask = make_batch()
    loss0, stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.0)
    assert stats["kl"].item() == pytest.approx(reference(logprobs, old, adv, mask, ref)[2], rel=1e-12)
    assert stats["kl"].item() > 0
    assert loss0.item() == pytest.approx(reference(logprobs, old, adv, mask)[0], rel=1e-12)  # but not in the loss


def test_kl_k3_per_token():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.0, -3.0], dtype=torch.float64)
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert kl_k3(logp, ref).tolist() == pytest.approx(want, rel=1e-15)
    assert kl_k3(logp, ref)[0].item() == 0.0 and (kl_k3(logp, ref) >= 0).all()


def test_dapo_micro_batches_add_up_to_the_full_batch():
    logprobs, old, ref, adv, mask = make_batch(seed=3)
    kw = dict(beta=0.04, epsilon_high=0.28, loss_type="dapo")
    full = logprobs.clone().requires_grad_(True)
    full_loss, _ = grpo_loss(full, old, adv, mask, ref_logprobs=ref, **kw)
    full_loss.backward()

    total_tokens = int(mask.sum())
    parts = logprobs.clone().requires_grad_(True)
    summed = 0.0
    for rows in (slice(0, 2), slice(2, 6)):  # uneven micro-batches: 10 and 16 tokens
        loss, _ = grpo_loss(parts[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows],
                            num_items_in_batch=total_tokens, **kw)
        loss.backward()
        summed += loss.item()
    assert summed == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-12, atol=1e-15)
    # Without the global count each half would be normalised by its own tokens instead.
    half, _ = grpo_loss(logprobs[:2], old[:2], adv[:2], mask[:2], ref_logprobs=ref[:2], **kw)
    assert half.item() == pytest.approx(reference(logprobs[:2], old[:2], adv[:2], mask[:2], ref[:2], 0.04,
                                                  0.2, 0.28, "dapo", num_items_in_batch=10)[0], rel=1e-12)


def test_dr_grpo_with_explicit_max_completion_length():
    logprobs, old, _, adv, mask = make_batch()
    x = logprobs.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old, adv, mask, loss_type="dr_grpo", max_completion_length=20)
    loss.backward()
    want_loss, want_grad, *_ = reference(logprobs, old, adv, mask, loss_type="dr_grpo", max_completion_length=20)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(x.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    default, _ = grpo_loss(logprobs, old, adv, mask, loss_type="dr_grpo")
    assert loss.item() == pytest.approx(default.item() * 7 / 20, rel=1e-12)  # the default length is L = 7


def test_one_update_per_rollout_has_zero_loss_but_the_policy_gradient():
    logprobs, _, _, _, mask = make_batch()
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.3, 0.9, 0.1], dtype=torch.float64), group_size=3)
    x = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(x, x.detach(), adv, mask)
    loss.backward()
    # rho == 1, so each sequence's mean term is -A_i and the grpo mean over sequences is -mean(A) = 0.
    # (bnpo / dr_grpo / dapo weight sequences by length, so their value is not 0 here.)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    assert stats["clip_ratio"].item() == 0.0
    B = len(LENGTHS)
    want = [[-adv[i].item() / (n * B) if t < n else 0.0 for t in range(7)] for i, n in enumerate(LENGTHS)]
    torch.testing.assert_close(x.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0.0)
    assert x.grad.abs().sum().item() > 0


def test_beta_without_reference_adds_nothing():
    logprobs, old, _, adv, mask = make_batch()
    with_beta, stats = grpo_loss(logprobs, old, adv, mask, beta=0.04)
    without, _ = grpo_loss(logprobs, old, adv, mask)
    assert with_beta.item() == without.item()
    assert stats["kl"].item() == 0.0


def test_empty_completion_counts_in_the_grpo_sequence_mean():
    lengths = [4, 0, 2]  # a completion with no token contributes 0 but still counts as a sequence
    logprobs, old, _, adv, mask = make_batch(lengths=lengths)
    for loss_type in LOSS_TYPES:
        loss, _ = grpo_loss(logprobs, old, adv, mask, loss_type=loss_type)
        assert loss.item() == pytest.approx(reference(logprobs, old, adv, mask, loss_type=loss_type)[0], rel=1e-12)


def test_float32_inputs_with_integer_mask():
    logprobs, old, ref, adv, mask = make_batch()
    loss, stats = grpo_loss(logprobs.float(), old.float(), adv.float(), mask.long(), ref_logprobs=ref.float(), beta=0.04)
    want = reference(logprobs, old, adv, mask, ref, 0.04)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want[0], rel=1e-5)
    assert stats["kl"].item() == pytest.approx(want[2], rel=1e-5)


def test_unknown_loss_type_lists_valid_ones():
    logprobs, old, _, adv, mask = make_batch()
    with pytest.raises(ValueError, match="'gspo'.*grpo, bnpo, dr_grpo, dapo"):
        grpo_loss(logprobs, old, adv, mask, loss_type="gspo")


# ---- group advantages ------------------------------------------------------------------------------

def numpy_advantages(rewards, group_size, scale, eps=1e-4):
    r = np.asarray(rewards, dtype=np.float64)
    groups = r.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std(ddof=1) + eps)
    return centred.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy(scale):
    rewards = [1.0, 0.0, 0.5, 2.0,  0.2, 0.2, 0.9, 0.0,  1.5, 1.5, 1.5, 1.5]  # G = 4, last group all equal
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size=4, scale=scale)
    np.testing.assert_allclose(got.numpy(), numpy_advantages(rewards, 4, scale), rtol=1e-12, atol=1e-15)
    assert got[8:].tolist() == [0.0] * 4  # exactly zero, not NaN and not 1e-17
    for group in got.view(3, 4):
        assert group.sum().item() == pytest.approx(0.0, abs=1e-12)


def test_group_advantages_custom_eps_and_all_equal_batch():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])
    got = group_advantages(rewards, group_size=2, eps=0.5)
    np.testing.assert_allclose(got.numpy(), numpy_advantages(rewards.numpy(), 2, "group", eps=0.5), rtol=1e-6)
    for scale in ("group", "batch", "none"):  # nothing to learn from: zero everywhere, never NaN
        assert group_advantages(torch.full((6,), 0.7), group_size=3, scale=scale).tolist() == [0.0] * 6


def test_an_equal_group_gets_zero_even_where_its_float_mean_is_inexact():
    # In float32 the mean of six 0.3s is not 0.3; dividing that residue by std + eps (std ~ 0)
    # would hand every completion of the group the same non-zero advantage.
    rewards = torch.tensor([0.3] * 6 + [0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float32)
    assert (rewards[:6] - rewards[:6].mean()).abs().max() > 0  # the premise: the residue exists
    for scale in ("group", "batch", "none"):
        got = group_advantages(rewards, group_size=6, scale=scale)
        assert got[:6].tolist() == [0.0] * 6, scale
        assert got[6:].abs().min() > 0.1, scale


def test_group_advantages_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"(?s)7.*3|3.*7"):
        group_advantages(torch.zeros(7), group_size=3)
    with pytest.raises(ValueError, match=r"got 1, for 4 rewards"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="'std'"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")
