"""How one token is drawn from a row of logits (`grpo.sampling.sample_tokens` and `draw`)."""

import math

import pytest
import torch

from grpo.sampling import SamplingParams, draw, sample_tokens


def test_draw_takes_the_smallest_arrival_time():
    probs = torch.tensor([[0.1, 0.0, 0.3, 0.6]])
    # E = -log u: index 0 gets E = 0.01 (time 0.1), index 2 E = 0.06 (0.2), index 3 E = 1 (1.67).
    uniforms = torch.exp(-torch.tensor([[0.01, 1e-6, 0.06, 1.0]]))
    assert draw(probs, uniforms).tolist() == [0]
    assert draw(probs * 7, uniforms).tolist() == [0]  # unnormalised rows draw the same
    uniforms[0, 0] = math.exp(-0.1)  # index 0's time is now 1.0: index 2 arrives first
    assert draw(probs, uniforms).tolist() == [2]


def test_draw_never_returns_a_zero_probability_index():
    # The only token allowed draws u = 0 (E = infinity before the clamp): it must still win.
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    uniforms = torch.tensor([[0.9999, 0.9999, 0.0, 0.9999], [0.9999, 0.0, 0.0, 0.9999]])
    assert draw(probs, uniforms).tolist() == [2, 1]


def test_a_small_change_of_the_probabilities_changes_few_draws():
    """The race's winners move about as often as the distributions differ (their total variation).
    Measured here: total variation 0.0033, the race moves 0.0045 of the draws; by inverse CDF (one
    uniform per row, the same first column) 0.026, and with a 1e-3 nudge 22x the race's count."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 628, generator=generator) * 3
    nudged = logits + 1e-2 * torch.randn(1, 628, generator=generator)
    p, q = logits.softmax(-1), nudged.softmax(-1)
    total_variation = 0.5 * float((p - q).abs().sum())
    uniforms = torch.rand(20_000, 628, generator=generator)
    moved = float((draw(p.expand(20_000, -1), uniforms) != draw(q.expand(20_000, -1), uniforms)).double().mean())
    assert 0 < moved < 3 * total_variation, (moved, total_variation)


def _frequencies(logits, params, draws=200_000, seed=0):
    tokens = sample_tokens(logits.expand(draws, -1), params, torch.Generator().manual_seed(seed))
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


def _chi_square(freq, probs, draws=200_000):
    keep = probs > 0
    return float((draws * (freq[keep] - probs[keep]) ** 2 / probs[keep]).sum())


def test_sampled_frequencies_follow_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]])
    for temperature in (1.0, 0.5):
        probs = (logits[0] / temperature).softmax(-1).double()
        freq = _frequencies(logits, SamplingParams(temperature=temperature))
        assert freq[4] == 0  # a forbidden token (-inf) is never drawn
        # 4 degrees of freedom: chi-square above 30 has probability ~5e-6 for a correct sampler; drawing
        # the neighbouring index, or at temperature 1 where 0.5 was asked, gives thousands.
        assert _chi_square(freq, probs) < 30, (temperature, freq, probs)


def test_top_k_and_top_p_keep_only_their_tokens_at_renormalised_probabilities():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    freq = _frequencies(logits, SamplingParams(top_k=2))
    assert freq[2:].sum() == 0
    assert _chi_square(freq[:2], torch.tensor([4 / 7, 3 / 7], dtype=torch.float64)) < 20
    freq = _frequencies(logits, SamplingParams(top_p=0.75))  # 0.4 + 0.3 < 0.75: the 0.2 token joins
    assert freq[3] == 0
    assert _chi_square(freq[:3], torch.tensor([4 / 9, 3 / 9, 2 / 9], dtype=torch.float64)) < 25


def test_one_seed_draws_the_same_tokens_and_another_seed_other_tokens():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams()
    first, again, other = (sample_tokens(logits, params, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(first, again)
    assert (first != other).sum() > 32


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, math.pi]])
    assert sample_tokens(logits, SamplingParams(temperature=0.0), None).tolist() == [1, 0]
