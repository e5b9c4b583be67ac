"""Every model family trains: log-probs on both paths equal the model's own forward, rollouts never
emit vision tokens and stop at the family's end of turn, and GRPO, SFT and evaluation run.

The test of record for a family is `completion_logprobs` (shared-prefix and plain) against the
model's own forward over the single unpadded sequence prompt + completion, built from the
processor's outputs, the model left to compute its own positions. Models run in float64 (some
norms compute in float32 inside, hence 1e-6, where a wrong position, mask or cache row is O(1e-2)).
"""

import copy

import pytest
import torch

from data import make_toy_dataset, sft_target, to_prompt_rows
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer, completion_logprobs, evaluate
from grpo.logprobs import group_logprobs
from grpo.models import family_for
from grpo.prompts import encode_prompts
from grpo.sampling import SamplingParams, generate
from grpo.tiny import FAMILIES, build_tiny_model_and_processor

CLOSE = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def rows():
    return to_prompt_rows(make_toy_dataset(8, seed=3, image_size=56), source="toy")


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request, rows):
    corpus = [row["question"] + " " + " ".join(row["options"]) + " " + row["explanation"] for row in rows]
    model, processor = build_tiny_model_and_processor(corpus=corpus, seed=0, family=request.param,
                                                      min_pixels=56 * 56, max_pixels=56 * 56)
    return request.param, model, processor


def own_forward_logprobs(model, processor, row, ids: list[int]) -> torch.Tensor:
    """log p(completion token t) from the model's own forward over prompt + completion, unpadded."""
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    images = [row["image"]] if row.get("image") is not None else None
    enc = dict(processor(text=[text], images=images, return_tensors="pt"))
    completion = torch.tensor([ids])
    enc["input_ids"] = torch.cat([enc["input_ids"], completion], 1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in enc:
            enc[key] = torch.cat([enc[key], torch.zeros_like(completion)], 1)
    logits = model(**enc).logits[0, -len(ids) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, completion[0][:, None]).squeeze(-1)


def varied_rows(rows):
    """Prompts of different lengths (left padding), one without an image."""
    longer = dict(rows[1])
    longer["prompt"] = copy.deepcopy(rows[1]["prompt"])
    longer["prompt"][-1]["content"][-1]["text"] += " Look closely at the stroma and the nuclei."
    text_only = {**rows[2], "image": None, "prompt": [{"role": "user", "content": rows[2]["question"]}]}
    return [rows[0], longer, text_only]


def test_completion_logprobs_equal_the_models_own_forward_on_both_paths(parts, rows, monkeypatch):
    """Plain, shared (packed where the family packs) and shared through the prompt's KV cache."""
    from grpo.models import Family

    name, model, processor = parts
    model = copy.deepcopy(model).double().eval()
    chosen = varied_rows(rows)
    g = torch.Generator().manual_seed(0)
    vocab = len(processor.tokenizer)
    completions = [[torch.randint(20, vocab, (n,), generator=g).tolist() for n in (1, 4, 7)] for _ in chosen]
    with torch.no_grad():
        shared = completion_logprobs(model, processor, chosen, completions, shared_prefix=True)
        plain = completion_logprobs(model, processor, chosen, completions, shared_prefix=False)
        monkeypatch.setattr(Family, "can_pack", lambda self, model: False)
        cached = completion_logprobs(model, processor, chosen, completions, shared_prefix=True)
        for row, ids_list, ours_s, ours_p, ours_c in zip(chosen, completions, shared, plain, cached):
            for ids, s, p, c in zip(ids_list, ours_s, ours_p, ours_c):
                expected = own_forward_logprobs(model, processor, row, ids)
                assert s.dtype == torch.float32 and s.shape == (len(ids),)
                torch.testing.assert_close(p.double(), expected, **CLOSE, msg=f"{name} plain")
                torch.testing.assert_close(s.double(), expected, **CLOSE, msg=f"{name} shared")
                torch.testing.assert_close(c.double(), expected, **CLOSE, msg=f"{name} shared, cached prompt")


def test_shared_prefix_gradients_equal_the_plain_paths(parts, rows, monkeypatch):
    """Packed (where the family packs), through the prompt's KV cache, and plain."""
    from grpo.models import Family

    name, model, processor = parts
    model = copy.deepcopy(model).double().train()
    family = family_for(model, processor, quiet=True)
    prompts = encode_prompts(family, varied_rows(rows), [0, 1, 2], 4096)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, len(processor.tokenizer), (6, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    weights = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)[:, None]
    grads = []
    for shared, pack in ((True, True), (True, False), (False, False)):
        if not pack:
            monkeypatch.setattr(Family, "can_pack", lambda self, model: False)
        model.zero_grad(set_to_none=True)
        logprobs = group_logprobs(family, model, prompts, [0, 0, 1, 1, 2, 2], ids, mask, shared_prefix=shared)
        (logprobs * mask * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and grads[0]
    for (key, value), variant in ((item, variant) for variant in (0, 1) for item in grads[2].items()):
        scale = float(value.abs().max())
        # Qwen3.5's linear-attention gate g is computed in float32 inside the model (`.float()`) and
        # summed over the sequence in a different order when the prompt is forwarded apart: its three
        # parameters agree to ~5e-4 of their largest gradient entry (every other one to ~2e-7).
        tolerance = 2e-3 if any(gate in key for gate in ("dt_bias", "A_log", "in_proj_a")) else 1e-6
        torch.testing.assert_close(grads[variant][key], value, atol=tolerance * scale + 1e-12, rtol=0,
                                   msg=f"{name} {key} {('packed', 'cached')[variant]}")


def test_rollout_never_samples_vision_tokens_and_stops_at_the_familys_end_of_turn(parts, rows):
    name, model, processor = parts
    model = copy.deepcopy(model).eval()
    family = family_for(model, processor, quiet=True)
    assert family.forbidden_ids, name
    tokens = processor.tokenizer.convert_ids_to_tokens(family.eos_ids)
    end_of_turn = {"gemma3": "<end_of_turn>"}.get(name, "<|im_end|>")
    assert end_of_turn in tokens and family.end_of_turn_id == processor.tokenizer.convert_tokens_to_ids(end_of_turn)
    boost = torch.zeros(len(processor.tokenizer))
    boost[family.forbidden_ids] = 100.0  # the vision tokens the most likely: still never sampled
    boost[family.end_of_turn_id] = 3.0  # some completions end early, others run to the limit
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost.to(output.dtype))
    prompts = encode_prompts(family, rows[:3], [0, 1, 2], 4096)
    out = generate(family, model, prompts, SamplingParams(max_new_tokens=10), group_size=4,
                   generator=torch.Generator().manual_seed(0))
    assert not torch.isin(out.ids, torch.tensor(family.forbidden_ids)).any()
    ended = torch.isin(out.ids, torch.tensor(family.eos_ids)).any(1)
    assert ended.any() and (~ended).any() and torch.equal(out.truncated, ~ended)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_every_decoding_step_scores_the_next_token_as_the_models_own_forward(parts, rows, shared_prefix):
    """The rollout's logits (the prefill's, then one cached token at a time, with the family's
    continuation kwargs) equal the model's own forward over the whole unpadded sequence, on the
    shared path (each prompt prefilled once) and on the plain one (each copy prefilled)."""
    name, model, processor = parts
    model = copy.deepcopy(model).double().eval()
    family = family_for(model, processor, quiet=True)
    chosen = varied_rows(rows)
    steps = []  # the lm_head output of every forward, one row per sequence: [B or N, V]
    # (a decoding step feeds [N, 1] tokens, or [B, G] where the family packs a prompt's G completions)
    model.lm_head.register_forward_hook(lambda module, inputs, output: steps.append(output.reshape(-1, output.shape[-1]).clone()))
    G = 2
    out = generate(family, model, encode_prompts(family, chosen, [0, 1, 2], 4096), SamplingParams(max_new_tokens=6),
                   group_size=G, generator=torch.Generator().manual_seed(0), shared_prefix=shared_prefix)
    assert (steps[0].shape[0] < out.ids.shape[0]) == (shared_prefix and family.fast_path)
    first = steps[0].repeat_interleave(G, 0) if steps[0].shape[0] < out.ids.shape[0] else steps[0]
    logits = torch.stack([first, *steps[1:]], dim=1)  # [N, steps, V]
    for i in range(out.ids.shape[0]):
        n = int(out.mask[i].sum())
        ids = out.ids[i, :n]
        ours = logits[i, :n].log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
        expected = own_forward_logprobs(model, processor, chosen[i // G], ids.tolist())
        torch.testing.assert_close(ours, expected, **CLOSE, msg=f"{name} completion {i}")


def test_grpo_sft_and_evaluation_run_on_every_family(parts, rows, tmp_path):
    name, model, processor = parts

    def answered(prompts, completions, **columns):
        return [float("<answer>" in c) + 0.01 * len(c) for c in completions]

    cfg = GRPOConfig(output_dir=str(tmp_path / "grpo"), group_size=2, prompts_per_step=2, completions_per_micro_batch=2,
                     max_completion_length=6, learning_rate=1e-3, max_steps=2, save_steps=0, freeze_vision_tower=True)
    trainer = Trainer(copy.deepcopy(model), processor, [answered], rows[:4], cfg)
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2] and all(h["kl"] >= 0 for h in history)
    assert (tmp_path / "grpo" / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "grpo" / "checkpoint-2").is_dir()
    frozen = {id(p) for m in trainer.family.vision_modules(trainer.model) for p in m.parameters()}
    assert frozen and all(not p.requires_grad for p in trainer.model.parameters() if id(p) in frozen)

    sft_rows = [{**row, "completion": sft_target(row)} for row in rows[:4]]
    sft = SFTTrainer(copy.deepcopy(model), processor, sft_rows, SFTConfig(
        output_dir=str(tmp_path / "sft"), batch_size=4, micro_batch_size=2, learning_rate=1e-2, max_steps=8,
        save_steps=0, freeze_vision_tower=False))
    losses = [h["loss"] for h in sft.train()]
    assert losses[-1] < 0.8 * losses[0], losses

    result = evaluate(sft.model, processor, rows[:3], [answered], batch_size=2, max_completion_length=5)
    assert len(result["records"]) == 3 and all(r["tokens"] <= 5 for r in result["records"])


def test_a_model_of_no_known_family_trains_on_the_plain_path_with_a_notice(rows, tmp_path, capsys):
    """A text-only causal LM (text-only rows): the plain path, log-probs equal to its own forward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, processor = build_tiny_model_and_processor(seed=0)
    tokenizer = processor.tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_rows = [{**row, "image": None, "prompt": [{"role": "user", "content": row["question"]}]} for row in rows[:4]]
    family = family_for(model, tokenizer)
    assert "plain path" in capsys.readouterr().err and not family.fast_path
    assert family.eos_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    double = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        ours = completion_logprobs(double, tokenizer, text_rows[:2], [[[40, 41, 42]], [[50]]])
        for row, (logprobs,), ids in zip(text_rows, ours, ([40, 41, 42], [50])):
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            full = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + ids])
            expected = double(full).logits[0, -len(ids) - 1 : -1].log_softmax(-1).gather(-1, full[0, -len(ids):, None])
            torch.testing.assert_close(logprobs.double(), expected.squeeze(-1), **CLOSE)

    cfg = GRPOConfig(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, completions_per_micro_batch=4,
                     max_completion_length=4, max_steps=2, save_steps=0)
    history = Trainer(model, tokenizer, [lambda prompts, completions, **c: [float(len(x)) for x in completions]],
                      text_rows, cfg).train()
    assert len(history) == 2


def test_a_model_without_a_language_model_head_is_refused():
    from transformers import Qwen2Config, Qwen2Model

    _, processor = build_tiny_model_and_processor(seed=0)
    model = Qwen2Model(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no language-model head"):
        family_for(model, processor.tokenizer)
