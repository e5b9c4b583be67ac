"""The shared-prompt optimisations compute exactly what the plain path computes.

Vision once (cached image features), prefill once (one prompt cache for G samples) and the
shared-prefix training forward (one prompt forward per pass, G completions on its KV cache) must
give the plain path's log-probs, gradients, rollouts and trainer steps. The model runs in float64;
Qwen2's RMSNorm still computes in float32, so values that are summed in a different order (the
shared prompt's gradient) can differ in the float32 rounding: gradients are compared to 1e-6 of their
largest entry, where a wrong position, mask or cache row would be off by O(1). Prompts are
left-padded to different lengths and completions ragged.
"""

import copy

import pytest
import torch

from grpo import GRPOConfig, Trainer
from grpo.logprobs import group_logprobs, plain_logprobs, with_image_features
from grpo.models import family_for
from grpo.prompts import encode_prompts
from grpo.sampling import SamplingParams, generate

TIGHT = dict(atol=1e-10, rtol=1e-9)


def assert_grads_close(grads, expected):
    assert grads.keys() == expected.keys()
    for name, value in expected.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(grads[name], value, atol=1e-6 * scale + 1e-12, rtol=0, msg=name)


@pytest.fixture(scope="module")
def family(tiny_parts):
    return family_for(*tiny_parts)


@pytest.fixture(scope="module")
def model64(tiny_parts):
    model, _ = tiny_parts
    return copy.deepcopy(model).double().train()


def text_only(rows):
    """The same questions without their image (a prompt with no vision tokens at all)."""
    return [{**row, "image": None, "prompt": [{"role": "user", "content": row["question"]}]} for row in rows]


def ragged_completions(n, length, vocab, eos, seed):
    """Random completion ids with an EOS at a different place in each row, pad after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, vocab, (n, length), generator=g)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        end = (3 * i + 1) % length  # every row ends elsewhere; the last ones run to the limit
        if i >= n - 1:
            end = length - 1
        else:
            ids[i, end] = eos
        mask[i, : end + 1] = 1
        ids[i, end + 1 :] = 0
    return ids, mask


def logprobs_and_grads(family, model, prompts, prompt_index, ids, mask, shared, weights):
    model.zero_grad(set_to_none=True)
    logprobs = group_logprobs(family, model, prompts, prompt_index, ids, mask, shared_prefix=shared, temperature=0.7)
    (logprobs * mask * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach() * mask, grads


@pytest.mark.parametrize("images", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_shared_prefix_and_cached_features_match_plain_logprobs_and_gradients(model64, family, toy_rows, images, group_size):
    processor = family.processor
    rows = toy_rows[:3] if images else text_only(toy_rows[:3])
    prompts = encode_prompts(family, rows, [0, 1, 2], max_prompt_length=4096)
    assert prompts.attention_mask.eq(0).any(), "the prompts should be left-padded to different lengths"
    n = 3 * group_size
    ids, mask = ragged_completions(n, 9, model64.config.text_config.vocab_size, processor.tokenizer.eos_token_id, seed=group_size)
    prompt_index = [i // group_size for i in range(n)]
    weights = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)[:, None]  # a different advantage per completion

    plain, plain_grads = logprobs_and_grads(family, model64, prompts, prompt_index, ids, mask, False, weights)
    cached = with_image_features(family, model64, prompts)
    assert (cached.image_features is not None) == images
    for variant, shared in [(prompts, True), (cached, False), (cached, True)]:
        ours, grads = logprobs_and_grads(family, model64, variant, prompt_index, ids, mask, shared, weights)
        torch.testing.assert_close(ours, plain, **TIGHT)
        expected = {k: v for k, v in plain_grads.items() if variant is prompts or "visual" not in k}
        assert_grads_close(grads, expected)
    # Cached features carry no gradient into the vision tower; pixels do (frozen or not is the trainer's call).
    assert not any("visual" in name for name in grads)
    assert any("visual" in name for name in plain_grads) == images


def test_shared_prefix_handles_prompts_used_unevenly_and_one_token_completions(model64, family, toy_rows):
    """A micro-batch may hold part of a group: prompts repeated different numbers of times, in any order."""
    processor = family.processor
    prompts = with_image_features(family, model64, encode_prompts(family, toy_rows[3:5], [3, 4], max_prompt_length=4096))
    prompt_index = [1, 0, 1, 1]
    for length in (1, 5):
        ids, mask = ragged_completions(4, length, model64.config.text_config.vocab_size, processor.tokenizer.eos_token_id, seed=length)
        with torch.no_grad():
            plain = plain_logprobs(family, model64, prompts.without_features().select(prompt_index), ids, mask)
            shared = group_logprobs(family, model64, prompts, prompt_index, ids, mask)
        torch.testing.assert_close(shared * mask, plain * mask, **TIGHT)


def test_gradient_checkpointing_keeps_the_shared_path_packed(model64, family, toy_rows, monkeypatch):
    """Checkpointing turns the KV cache off; the packed shared path needs none, so it still runs and
    gives the plain path's log-probs and gradients."""
    import grpo.logprobs

    calls = []
    packed = grpo.logprobs.packed_logprobs
    monkeypatch.setattr(grpo.logprobs, "packed_logprobs", lambda *a, **k: calls.append(1) or packed(*a, **k))
    processor = family.processor
    model = copy.deepcopy(model64)
    model.activation_checkpointing_enable()
    model.train()
    prompts = encode_prompts(family, toy_rows[:2], [0, 1], max_prompt_length=4096)
    ids, mask = ragged_completions(4, 6, model.config.text_config.vocab_size, processor.tokenizer.eos_token_id, seed=3)
    weights = torch.ones(4, 1, dtype=torch.float64)
    plain, plain_grads = logprobs_and_grads(family, model64, prompts, [0, 0, 1, 1], ids, mask, False, weights)
    ours, grads = logprobs_and_grads(family, model, prompts, [0, 0, 1, 1], ids, mask, True, weights)
    assert calls == [1]
    torch.testing.assert_close(ours, plain, **TIGHT)
    assert_grads_close(grads, plain_grads)


@pytest.mark.parametrize("group_size", [2, 4])
def test_rollout_with_cached_features_is_token_identical(model64, family, toy_rows, group_size):
    tok = family.tokenizer
    model = copy.deepcopy(model64).eval()
    prompts = encode_prompts(family, toy_rows[:3], [0, 1, 2], max_prompt_length=4096)
    cached = with_image_features(family, model, prompts)
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_new_tokens=10, temperature=temperature)
        runs = [generate(family, model, p, params, group_size=group_size, generator=torch.Generator().manual_seed(5),
                         shared_prefix=shared)
                for p, shared in ((prompts, True), (cached, True), (prompts, False))]  # the last: the plain path's rollout
        for run in runs[1:]:
            assert torch.equal(runs[0].ids, run.ids) and torch.equal(runs[0].mask, run.mask)

    # Greedy decoding is also HF generate's (each of the G identical samples).
    ours = generate(family, model, cached, SamplingParams(max_new_tokens=10, temperature=0.0), group_size=group_size)
    hf = model.generate(
        input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, mm_token_type_ids=prompts.token_types,
        **prompts.pixel_inputs(), do_sample=False,
        max_new_tokens=ours.ids.shape[1], suppress_tokens=family.forbidden_ids,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )[:, prompts.input_ids.shape[1]:].repeat_interleave(group_size, 0)
    assert torch.equal(hf * ours.mask, ours.ids * ours.mask)


def char_count(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("settings", [
    dict(group_size=2, completions_per_micro_batch=2, beta=0.04, num_iterations=2, freeze_vision_tower=True),
    dict(group_size=4, completions_per_micro_batch=8, beta=0.04, num_iterations=1, freeze_vision_tower=False),
], ids=["G2-mu2", "G4-trainable-vision"])
def test_trainer_steps_equal_with_and_without_shared_prefix(model64, tiny_parts, toy_rows, tmp_path, settings):
    """Same rollout, loss, KL, grad norm and updated weights; the reference has its own vision tower."""
    _, processor = tiny_parts
    ref = copy.deepcopy(model64)
    with torch.no_grad():
        for p in ref.model.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    results = []
    for shared in (True, False):
        cfg = GRPOConfig(output_dir=str(tmp_path / str(shared)), prompts_per_step=2, max_completion_length=8,
                         learning_rate=1e-3, max_steps=2, save_steps=0, seed=0, shared_prefix=shared, **settings)
        trainer = Trainer(copy.deepcopy(model64), processor, [char_count], toy_rows[:4], cfg, ref_model=ref)
        assert not trainer.ref_shares_vision
        history = trainer.train()
        results.append((history, dict(trainer.model.named_parameters())))
    (shared_history, shared_params), (plain_history, plain_params) = results
    for ours, plain in zip(shared_history, plain_history):
        assert ours["clip_ratio"] == pytest.approx(plain["clip_ratio"], abs=0.05)  # a token on the clip edge may flip
        for key in ("loss", "kl", "grad_norm", "reward", "completion_length/mean"):
            # float32 RMSNorm inside a float64 model: agreement to ~1e-6, not to float64 precision.
            assert ours[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key
    assert shared_history[-1]["kl"] > 0
    # The weights' updates agree up to float32 rounding, which Adam amplifies where a gradient is
    # tiny (it divides by its own size), so an element-wise check would mostly measure that rounding;
    # a wrong gradient is off by O(1) in relative norm.
    for name, value in plain_params.items():
        start = model64.get_parameter(name).detach()
        ours, theirs = (shared_params[name] - start).detach(), (value - start).detach()
        assert float((ours - theirs).norm()) <= 1e-2 * float(theirs.norm()) + 1e-12, name
    vision = [name for name in plain_params if "visual" in name]
    moved = any(not torch.equal(plain_params[name], model64.get_parameter(name)) for name in vision)
    assert moved == (not settings["freeze_vision_tower"])


def test_token_entropies_from_the_log_prob_pass_on_both_paths(model64, family, toy_rows):
    """`with_entropy=True` returns the same log-probs and each position's entropy of softmax(logits / T),
    equal on the shared and plain paths; `gather_logprobs` computes it row by row as float64 would."""
    from grpo.logprobs import gather_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, 50, (3, 4), generator=g)
    logprobs, entropies = gather_logprobs(logits, ids, 0.7, with_entropy=True)
    want = torch.distributions.Categorical(logits=logits / 0.7).entropy()
    assert entropies.dtype == torch.float32
    torch.testing.assert_close(entropies.double(), want, rtol=1e-5, atol=1e-5)  # fp32 of terms up to ~15
    torch.testing.assert_close(logprobs, gather_logprobs(logits, ids, 0.7))

    processor = family.processor
    prompts = with_image_features(family, model64, encode_prompts(family, toy_rows[:2], [0, 1], max_prompt_length=4096))
    for length in (1, 6):
        ids, mask = ragged_completions(4, length, model64.config.text_config.vocab_size, processor.tokenizer.eos_token_id, seed=length)
        with torch.no_grad():
            shared = group_logprobs(family, model64, prompts, [0, 0, 1, 1], ids, mask, temperature=0.7, with_entropy=True)
            plain = group_logprobs(family, model64, prompts, [0, 0, 1, 1], ids, mask, temperature=0.7, shared_prefix=False,
                                   with_entropy=True)
            alone = group_logprobs(family, model64, prompts, [0, 0, 1, 1], ids, mask, temperature=0.7)
        torch.testing.assert_close(shared[0] * mask, alone * mask, **TIGHT)
        torch.testing.assert_close(shared[1] * mask, plain[1] * mask, **TIGHT)
        torch.testing.assert_close(plain[0] * mask, alone * mask, **TIGHT)
        assert (shared[1][mask.bool()] > 0).all()


def test_packed_path_under_eager_attention_uses_an_additive_mask(model64, family, toy_rows):
    """Eager attention adds the mask to the scores: the packed path hands it 0 / -inf-like floats."""
    model = copy.deepcopy(model64)
    model.set_attn_implementation("eager")
    assert family.can_pack(model) and family.attention_implementation(model) == "eager"
    prompts = encode_prompts(family, toy_rows[:2], [0, 1], max_prompt_length=4096)
    ids, mask = ragged_completions(4, 6, model.config.text_config.vocab_size, family.processor.tokenizer.eos_token_id, seed=5)
    with torch.no_grad():
        plain = plain_logprobs(family, model64, prompts.select([0, 0, 1, 1]), ids, mask)
        packed = group_logprobs(family, model, prompts, [0, 0, 1, 1], ids, mask)
    # eager attention takes its softmax in float32 even for a float64 model: 1e-6, not TIGHT
    torch.testing.assert_close(packed * mask, plain * mask, atol=1e-6, rtol=1e-6)


def test_packed_decoding_under_eager_attention_samples_what_sdpa_samples(model64, family, toy_rows):
    """Decoding feeds a prompt's G tokens in one row under a mask: boolean for sdpa, additive for eager.
    (float32: transformers' own eager prefill of left-padded prompts gives NaN in float64.)"""
    sdpa = copy.deepcopy(model64).float()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    prompts = encode_prompts(family, toy_rows[:2], [0, 1], max_prompt_length=4096)
    runs = [generate(family, model.eval(), prompts, SamplingParams(max_new_tokens=8), group_size=3,
                     generator=torch.Generator().manual_seed(0)) for model in (sdpa, eager)]
    assert family.can_pack(sdpa) and family.attention_implementation(eager) == "eager"
    assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].mask, runs[1].mask)


def test_long_completions_take_the_cached_prompt_path_unless_checkpointing(model64, family, toy_rows, monkeypatch):
    """The packed mask is dense: when G completions are long beside the prompt, its attention costs
    more than twice the cached path's, and the cached path runs (the packed one under checkpointing)."""
    import grpo.logprobs

    taken = []
    for name in ("packed_logprobs", "shared_prefix_logprobs"):
        real = getattr(grpo.logprobs, name)
        monkeypatch.setattr(grpo.logprobs, name, lambda *a, _real=real, _name=name, **k: taken.append(_name) or _real(*a, **k))
    prompts = encode_prompts(family, toy_rows[:1], [0], max_prompt_length=4096)
    P = prompts.input_ids.shape[1]
    for length, expected in ((P // 4, "packed_logprobs"), (2 * P, "shared_prefix_logprobs")):
        ids, mask = ragged_completions(4, length, model64.config.text_config.vocab_size, family.processor.tokenizer.eos_token_id, seed=2)
        with torch.no_grad():
            shared = group_logprobs(family, model64, prompts, [0, 0, 0, 0], ids, mask)
            plain = plain_logprobs(family, model64, prompts.select([0, 0, 0, 0]), ids, mask)
        assert taken.pop() == expected, (length, P)
        torch.testing.assert_close(shared * mask, plain * mask, **TIGHT)
    model = copy.deepcopy(model64)
    model.activation_checkpointing_enable()
    model.train()
    group_logprobs(family, model, prompts, [0, 0, 0, 0], ids, mask)
    assert taken.pop() == "packed_logprobs"


def test_a_forward_that_cannot_take_cached_features_gets_pixels(model64, family, toy_rows):
    """Before transformers 5.18 the forward had no `mm_encoder_outputs`: it took cached features into
    **kwargs, ignored them and read the image tokens as plain embeddings (shared log-probs off by
    ~0.08 nats on the tiny model, by several on a 7B one). Such a model must get its pixels."""
    base = type(model64)

    class OldForward(base):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            kwargs.pop("mm_encoder_outputs", None)  # what the old forward did with it, in effect
            return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                **kwargs)

    old = copy.deepcopy(model64)
    old.__class__ = OldForward
    old_family = family_for(old, family.processor)
    assert family.caches_features and not old_family.caches_features
    prompts = encode_prompts(old_family, toy_rows[:2], [0, 1], max_prompt_length=4096)
    assert with_image_features(old_family, old, prompts).image_features is None
    ids, mask = ragged_completions(4, 6, model64.config.text_config.vocab_size, family.processor.tokenizer.eos_token_id, seed=7)
    with torch.no_grad():
        expected = plain_logprobs(family, model64, prompts.select([0, 0, 1, 1]), ids, mask)
        shared = group_logprobs(old_family, old, with_image_features(old_family, old, prompts), [0, 0, 1, 1], ids, mask)
    torch.testing.assert_close(shared * mask, expected * mask, **TIGHT)
