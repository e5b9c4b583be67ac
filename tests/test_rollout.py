import copy

import pytest
import torch

import grpo.sampling

from grpo.logprobs import plain_logprobs
from grpo.models import family_for
from grpo.prompts import encode_prompts
from grpo.sampling import SamplingParams, generate


def _setup(tiny_parts, toy_rows, n=3):
    model, processor = tiny_parts
    model = copy.deepcopy(model)
    family = family_for(model, processor)
    prompts = encode_prompts(family, toy_rows[:n], list(range(n)), max_prompt_length=4096)
    return model, family, prompts


def _boost(model, token_ids, amount=100.0):
    """Make `token_ids` the most likely next tokens everywhere."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_ids] += amount
        return output

    model.lm_head.register_forward_hook(hook)


def test_rollout_masks_eos_truncation_and_forbidden_tokens(tiny_parts, toy_rows):
    model, family, prompts = _setup(tiny_parts, toy_rows)
    tok = family.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert family.eos_ids == [eos]  # from the generation config and the chat template
    forbidden = family.forbidden_ids
    assert sorted(tok.convert_ids_to_tokens(forbidden)) == sorted(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    # Make the vision tokens the most likely ones: they must still never be sampled. EOS made
    # moderately likely, so that some completions end mid-way while others run to the limit.
    _boost(model, forbidden)
    _boost(model, [eos], amount=3.0)
    g = torch.Generator().manual_seed(0)
    out = generate(family, model, prompts, SamplingParams(max_new_tokens=12), group_size=4, generator=g)
    assert out.ids.shape[0] == 12 and out.ids.shape[1] <= 12
    assert not torch.isin(out.ids, torch.tensor(forbidden)).any()
    for ids, mask, truncated in zip(out.ids.tolist(), out.mask.tolist(), out.truncated.tolist()):
        if eos in ids:
            end = ids.index(eos)
            assert mask == [1] * (end + 1) + [0] * (len(ids) - end - 1)
            assert all(t == tok.pad_token_id for t in ids[end + 1:])
            assert not truncated
        else:
            assert mask == [1] * len(ids) and truncated
    ended_early = [eos in ids[:-1] for ids in out.ids.tolist()]
    assert any(ended_early) and out.truncated.any()  # both branches above were exercised


def test_eos_everywhere_ends_after_one_token(tiny_parts, toy_rows):
    model, family, prompts = _setup(tiny_parts, toy_rows, n=2)
    eos = family.eos_ids[0]
    _boost(model, [eos])
    out = generate(family, model, prompts, SamplingParams(max_new_tokens=10, temperature=0.0), group_size=2)
    assert out.ids.shape == (4, 1) and out.ids.eq(eos).all() and out.mask.eq(1).all() and not out.truncated.any()


@pytest.mark.parametrize("amount", [4.0, 6.0])  # some completions run to the limit / every one ends early
def test_checking_for_the_end_every_few_steps_gives_the_same_completions(tiny_parts, toy_rows, monkeypatch, amount):
    """On a GPU the loop asks whether every completion has ended only every 16 steps (each question
    waits for the device) and cuts the extra padding steps off: the same ids, masks and lengths as
    asking at every step."""
    model, family, prompts = _setup(tiny_parts, toy_rows)
    _boost(model, family.eos_ids, amount=amount)
    outs = {}
    for every in (1, 4, 5):
        monkeypatch.setattr(grpo.sampling, "done_check_interval", lambda device, every=every: every)
        outs[every] = generate(family, model, prompts, SamplingParams(max_new_tokens=24), group_size=4,
                               generator=torch.Generator().manual_seed(1))
    assert (outs[1].ids.shape[1] < 24) == (amount == 6.0)  # all ended early: the loop stopped before the limit
    for every in (4, 5):
        assert torch.equal(outs[every].ids, outs[1].ids) and torch.equal(outs[every].mask, outs[1].mask)
        assert torch.equal(outs[every].truncated, outs[1].truncated)


def test_logprobs_equal_plain_full_forward(tiny_parts, toy_rows):
    """Our gathered log-probs == a plain forward on the processor's complete inputs (with mRoPE)."""
    model, family, prompts = _setup(tiny_parts, toy_rows)
    processor = family.processor
    g = torch.Generator().manual_seed(1)
    out = generate(family, model, prompts, SamplingParams(max_new_tokens=8), group_size=2, generator=g)
    index = [i // 2 for i in range(6)]
    ours = plain_logprobs(family, model, prompts.select(index), out.ids, out.mask, temperature=0.7)

    for i in range(6):
        row = toy_rows[index[i]]
        text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=[row["image"]], return_tensors="pt")
        n = int(out.mask[i].sum())
        ids = out.ids[i, :n]
        full = {k: v for k, v in enc.items()}
        full["input_ids"] = torch.cat([enc["input_ids"], ids[None]], 1)
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        full["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids[None])], 1)
        with torch.no_grad():
            logits = model(**full).logits[0, -n - 1:-1].double() / 0.7
        expected = logits.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
        torch.testing.assert_close(ours[i, :n].double(), expected, atol=1e-5, rtol=1e-5)

    # Without mm_token_type_ids the model silently falls back to 1-D positions: a different answer,
    # which is what this test guards against.
    full.pop("mm_token_type_ids")
    with torch.no_grad():
        wrong = model(**full).logits[0, -n - 1:-1].double() / 0.7
    assert not torch.allclose(wrong.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1), expected, atol=1e-4)


def test_a_reserved_cache_holds_what_concatenation_would_past_its_room():
    """Decoding writes keys and values into reserved room; past it the layer grows by concatenation.
    Either way it hands attention the same tensors as transformers' own concatenating layer."""
    from transformers.cache_utils import DynamicCache

    from grpo.sampling import reserve_cache

    torch.manual_seed(0)
    ours, theirs = DynamicCache(), DynamicCache()
    prompt = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    for cache in (ours, theirs):
        cache.update(*prompt, layer_idx=0)
    reserve_cache(ours, room=2)
    assert type(ours.layers[0]).__name__ == "_ReservedLayer"
    for step in range(4):  # two steps in the room, two past it
        new = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        got, want = ours.update(*new, layer_idx=0), theirs.update(*new, layer_idx=0)
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"step {step}"
        assert ours.get_seq_length() == theirs.get_seq_length() == 6 + step
