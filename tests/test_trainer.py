"""The GRPO and SFT trainers and evaluate(), end to end on the tiny Qwen2.5-VL.

What a user relies on: a run writes the metrics, samples and checkpoints it promises; a resumed run
is the run that was never interrupted; reward metrics skip None and weight the sum; bad data fails
naming the row; SFT trains on the assistant tokens only; and both trainers actually learn.
"""

import copy
import json
import os
import shutil
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration

from data import build_messages, sft_target
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer, evaluate
from grpo.models import family_for
from grpo.prompts import encode_prompts
from grpo.sft import encode_targets
from rewards import format_reward

METRIC_KEYS = [
    "step", "loss", "reward", "reward_std", "kl", "clip_ratio", "dual_clip_ratio", "grad_norm", "lr", "completion_length/mean",
    "completion_length/min", "completion_length/max", "truncated_frac", "frac_reward_zero_std", "step_time",
    "tokens_per_sec",
]


def char_count(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def vowel_fraction(prompts, completions, **columns):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def fewer_vowels(prompts, completions, **columns):
    return [-v for v in vowel_fraction(prompts, completions)]


def small_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, completions_per_micro_batch=2,
                    max_completion_length=8, learning_rate=1e-3, max_steps=3, save_steps=0, seed=0)
    settings.update(overrides)
    return GRPOConfig(**settings)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------- a GRPO run and its files


def test_grpo_run_trains_the_language_model_and_writes_metrics_samples_checkpoints(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    model = copy.deepcopy(model)
    before = state(model)
    cfg = small_config(tmp_path, max_steps=3, save_steps=2, beta=0.04, log_completions=4, freeze_vision_tower=True)
    trainer = Trainer(model, processor, [char_count], toy_rows[:8], cfg)
    history = trainer.train()
    after = state(trainer.model)

    # The vision tower is frozen and untouched; every language-model tensor moved.
    for name, value in after.items():
        if ".visual." in f".{name}":
            assert torch.equal(value, before[name]), f"frozen vision weight {name} changed"
        else:
            assert not torch.equal(value, before[name]), f"trainable weight {name} did not change"
    assert not any(p.requires_grad for p in trainer.model.model.visual.parameters())

    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics == json.loads(json.dumps(history))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(METRIC_KEYS + ["rewards/char_count/mean", "rewards/char_count/std"]) <= set(m)
        assert m["lr"] == pytest.approx(1e-3)
        assert 1 <= m["completion_length/min"] <= m["completion_length/mean"] <= m["completion_length/max"] <= 8
        assert 0.0 <= m["truncated_frac"] <= 1.0 and 0.0 <= m["frac_reward_zero_std"] <= 1.0
        assert m["rewards/char_count/mean"] == pytest.approx(m["reward"])  # one function, weight 1
    # Step 1's policy is the reference; after an update it is not.
    assert abs(metrics[0]["kl"]) < 1e-6 and metrics[-1]["kl"] > 0

    # All 4 completions of each step are logged: the reward is the function applied to the logged text,
    # the step's reward is their mean, and advantages centre each group of G=2.
    samples = read_jsonl(tmp_path / "completions.jsonl")
    assert len(samples) == 3 * 4 and {"completion", "reward", "advantage"} <= set(samples[0])
    for step, m in enumerate(metrics, start=1):
        logged = [s for s in samples if s["step"] == step]
        assert [s["reward"] for s in logged] == char_count(None, [s["completion"] for s in logged])
        assert statistics.mean(s["reward"] for s in logged) == pytest.approx(m["reward"])
        for a, b in zip(logged[::2], logged[1::2]):
            assert a["advantage"] + b["advantage"] == pytest.approx(0.0, abs=1e-5)
            assert (a["advantage"] > b["advantage"]) == (a["reward"] > b["reward"])

    # checkpoint-2 (save_steps) and checkpoint-3 (the end); each loads with plain transformers.
    for step in (2, 3):
        path = tmp_path / f"checkpoint-{step}"
        assert any(name.endswith(".safetensors") for name in os.listdir(path))
        assert torch.load(path / "trainer_state.pt", weights_only=False)["step"] == step
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-3").state_dict()
    assert loaded.keys() == after.keys()
    for name, value in after.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen-vision", "trained-vision"])
def test_the_reference_is_the_starting_policy_sharing_only_a_frozen_vision_tower(tiny_parts, toy_rows, tmp_path, freeze):
    # A frozen tower is the same module in the reference (no copy); a trained one is copied as it started.
    model, processor = tiny_parts
    model = copy.deepcopy(model)
    before = state(model)
    cfg = small_config(tmp_path, max_steps=2, beta=0.04, freeze_vision_tower=freeze)
    trainer = Trainer(model, processor, [char_count], toy_rows[:8], cfg)
    trainer.train()
    policy, ref = trainer.model.model, trainer.ref_model.model
    assert (ref.visual is policy.visual) == freeze and trainer.ref_shares_vision == freeze
    assert ref.language_model is not policy.language_model
    for name, value in trainer.ref_model.state_dict().items():
        assert torch.equal(value, before[name]), f"reference weight {name} moved"
    moved = [name for name, value in trainer.model.state_dict().items() if not torch.equal(value, before[name])]
    assert any(".visual." in f".{name}" for name in moved) != freeze and any(".language_model." in name for name in moved)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


# ---------------------------------------------------------------- resume


def test_resumed_run_equals_the_uninterrupted_run(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    # Cosine schedule with warmup, a reference model and two updates per rollout: all of it must resume.
    settings = dict(max_steps=4, save_steps=2, seed=3, beta=0.04, num_iterations=2, lr_scheduler="cosine",
                    warmup_steps=1, log_completions=4)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    run_a = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8], small_config(dir_a, **settings))
    run_a.train()
    metrics_a = read_jsonl(dir_a / "metrics.jsonl")

    # B crashed during step 4 of the same run: checkpoint-2 complete, metrics logged up to step 3,
    # and a later checkpoint half written (the .tmp directory a crash mid-save leaves).
    dir_b.mkdir()
    shutil.copytree(dir_a / "checkpoint-2", dir_b / "checkpoint-2")
    (dir_b / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics_a[:3]))
    (dir_b / "checkpoint-6.tmp").mkdir()
    (dir_b / "checkpoint-6.tmp" / "trainer_state.pt").write_bytes(b"half written")
    run_b = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8],
                    small_config(dir_b, resume_from_checkpoint="latest", **settings))
    history_b = run_b.train()

    assert [m["step"] for m in history_b] == [3, 4]
    metrics_b = read_jsonl(dir_b / "metrics.jsonl")
    assert [m["step"] for m in metrics_b] == [1, 2, 3, 4]  # the crashed run's step 3 was replaced
    for a, b in zip(metrics_a[2:], metrics_b[2:]):
        for key in ("reward", "reward_std", "loss", "kl", "clip_ratio", "grad_norm", "lr", "completion_length/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    samples_a = [s for s in read_jsonl(dir_a / "completions.jsonl") if s["step"] > 2]
    samples_b = [s for s in read_jsonl(dir_b / "completions.jsonl") if s["step"] > 2]
    assert [s["completion"] for s in samples_b] == [s["completion"] for s in samples_a]
    final_a, final_b = state(run_a.model), state(run_b.model)
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert (dir_b / "checkpoint-4" / "trainer_state.pt").is_file()


def test_resumed_sft_run_equals_the_uninterrupted_run(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:8]]
    settings = dict(batch_size=2, micro_batch_size=1, learning_rate=1e-3, max_steps=4, save_steps=2,
                    lr_scheduler="cosine", warmup_steps=1)
    run_a = SFTTrainer(copy.deepcopy(model), processor, rows, SFTConfig(output_dir=str(tmp_path / "a"), **settings))
    history_a = run_a.train()
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run_b = SFTTrainer(copy.deepcopy(model), processor, rows,
                       SFTConfig(output_dir=str(tmp_path / "b"), resume_from_checkpoint="latest", **settings))
    history_b = run_b.train()
    assert [m["step"] for m in history_b] == [3, 4]
    for a, b in zip(history_a[2:], history_b):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    final_a, final_b = state(run_a.model), state(run_b.model)
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_trainer_reward_metrics_skip_none_and_weight_the_sum(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    returned = []  # what half_none returned, one list per step

    async def half_none(prompts, completions, **columns):
        values = [float(len(c)) if i % 2 == 0 else None for i, c in enumerate(completions)]
        returned.append(values)
        return values

    def one(prompts, completions, **columns):
        return [1.0] * len(completions)

    cfg = small_config(tmp_path, max_steps=2, beta=0.0)
    history = Trainer(copy.deepcopy(model), processor, [half_none, one], toy_rows[:8], cfg,
                      reward_weights=[2.0, 1.0]).train()
    assert len(returned) == 2
    for record, values in zip(history, returned):
        applied = [v for v in values if v is not None]
        assert len(applied) == len(values) // 2
        assert record["rewards/half_none/mean"] == pytest.approx(statistics.mean(applied))
        assert record["rewards/half_none/std"] == pytest.approx(statistics.stdev(applied))
        assert record["rewards/one/mean"] == 1.0
        assert record["reward"] == pytest.approx(statistics.mean(2.0 * (v or 0.0) + 1.0 for v in values))


def test_dual_clip_reaches_the_loss_when_the_policy_moves_within_a_rollout(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    # Three updates per rollout at a large learning rate: ratios leave [1/1.05, 1.05] on the later passes.
    cfg = small_config(tmp_path, max_steps=2, beta=0.0, num_iterations=3, learning_rate=5e-2, dual_clip=1.05)
    history = Trainer(copy.deepcopy(model), processor, [vowel_fraction], toy_rows[:8], cfg).train()
    assert max(record["dual_clip_ratio"] for record in history) > 0
    plain = Trainer(copy.deepcopy(model), processor, [vowel_fraction], toy_rows[:8],
                    small_config(tmp_path / "plain", max_steps=1, beta=0.0, num_iterations=3, learning_rate=5e-2)).train()
    assert plain[0]["dual_clip_ratio"] == 0.0


class CountingReward:
    """A reward with a `stats()` method, as a judge has: counts completions scored since the last call."""

    __name__ = "counter"

    def __init__(self):
        self.scored = 0

    def __call__(self, prompts, completions, **columns):
        self.scored += len(completions)
        return [1.0] * len(completions)

    def stats(self):
        scored, self.scored = self.scored, 0
        return {"scored": np.int64(scored), "latency": 0.25, "label": "toy"}  # numpy counts, as many servers' clients give


def test_reward_stats_are_logged_per_step_and_evaluation_traffic_apart(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    counter = CountingReward()
    cfg = small_config(tmp_path, max_steps=2, beta=0.0, eval_steps=1, eval_batch_size=2)
    Trainer(copy.deepcopy(model), processor, [counter], toy_rows[:8], cfg, eval_dataset=toy_rows[8:11]).train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["counter/scored"] for r in records] == [4, 4]  # 2 prompts x G = 2 per step, never the eval's
    assert [r["eval/counter/scored"] for r in records] == [3, 3]  # each evaluation: the 3 eval rows
    assert records[0]["counter/label"] == "toy" and records[0]["counter/latency"] == 0.25


# ---------------------------------------------------------------- bad input


def test_group_size_one_is_rejected():
    with pytest.raises(ValueError, match=r"group_size.*got 1"):
        GRPOConfig(group_size=1)


def test_micro_batch_must_divide_the_completions_per_step():
    with pytest.raises(ValueError) as error:
        GRPOConfig(prompts_per_step=3, group_size=2, completions_per_micro_batch=4)
    message = str(error.value)
    for part in ("completions_per_micro_batch=4", "prompts_per_step 3", "group_size 2", "= 6"):
        assert part in message


def test_row_without_prompt_is_named(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [dict(row) for row in toy_rows[:8]]
    del rows[5]["prompt"]
    with pytest.raises(ValueError, match=r"row 5\b.*'prompt'"):
        Trainer(copy.deepcopy(model), processor, [char_count], rows, small_config(tmp_path))


def test_missing_image_fails_at_its_step_naming_the_row_and_keeps_earlier_metrics(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [dict(row) for row in toy_rows[:8]]
    trainer = Trainer(copy.deepcopy(model), processor, [char_count], rows,
                      small_config(tmp_path, prompts_per_step=4, completions_per_micro_batch=8, max_steps=3))
    first_rows = trainer._rows_for_step(0)[1]
    bad = trainer._rows_for_step(1)[1][0]  # used by step 2, not step 1
    assert bad not in first_rows
    rows[bad]["image"] = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=rf"row {bad}\b.*'image'"):
        trainer.train()
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("field, value", [("image", None), ("images", [])])
def test_a_prompt_whose_image_is_absent_is_named(tiny_parts, toy_rows, field, value):
    _, processor = tiny_parts
    rows = [dict(row) for row in toy_rows[:3]]
    rows[1].pop("image")
    rows[1][field] = value
    with pytest.raises(ValueError, match=r"row 11\b.*1 image part.*'image'.*gives 0"):
        encode_prompts(family_for(*tiny_parts), rows, [10, 11, 12], max_prompt_length=1024)


def test_every_kind_of_image_part_the_chat_template_renders_needs_an_image(tiny_parts, toy_rows):
    _, processor = tiny_parts
    row = dict(toy_rows[0])
    text = {"type": "text", "text": "What stain is this?"}
    for part in ({"type": "image_url", "image_url": {"url": "tile.png"}}, {"image": "tile.png"}):
        row["prompt"] = [{"role": "user", "content": [part, text]}]
        row["image"] = None
        with pytest.raises(ValueError, match=r"row 0\b.*1 image part.*gives 0"):
            encode_prompts(family_for(*tiny_parts), [row], [0], max_prompt_length=1024)
        row["prompt"] = [{"role": "user", "content": [text]}]
        row["image"] = toy_rows[0]["image"]
        with pytest.raises(ValueError, match=r"row 0\b.*0 image part.*gives 1"):
            encode_prompts(family_for(*tiny_parts), [row], [0], max_prompt_length=1024)


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p=1.5"):
        GRPOConfig(top_p=1.5)
    with pytest.raises(ValueError, match=r"dual_clip must be > 1.*got 0.5"):
        GRPOConfig(dual_clip=0.5)


# ---------------------------------------------------------------- SFT


def _independent_sft_nll(model, processor, row):
    """Summed NLL of the assistant turn (completion + <|im_end|>) from a plain forward over the
    processor's inputs for the whole conversation, prompt tokens labelled -100; and the token count."""
    messages = row["prompt"] + [{"role": "assistant", "content": [{"type": "text", "text": row["completion"]}]}]
    full_text = processor.apply_chat_template(messages, tokenize=False)
    assert full_text.endswith("<|im_end|>\n")
    full_text = full_text[:-1]  # the turn ends at <|im_end|>
    prompt_text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = processor(text=[full_text], images=[row["image"]], return_tensors="pt")
    prompt_ids = processor(text=[prompt_text], images=[row["image"]], return_tensors="pt")["input_ids"][0]
    n_prompt = len(prompt_ids)
    assert torch.equal(full["input_ids"][0, :n_prompt], prompt_ids)
    assert full["mm_token_type_ids"][0, n_prompt:].eq(0).all()
    labels = full["input_ids"][0].clone()
    labels[:n_prompt] = -100
    logits = model(**full).logits[0]
    nll = F.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def test_sft_loss_is_cross_entropy_on_the_assistant_tokens_only(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:3]]
    trainer = SFTTrainer(copy.deepcopy(model), processor, rows, SFTConfig(output_dir=str(tmp_path), batch_size=3,
                                                                          micro_batch_size=3))
    with torch.no_grad():
        # One padded batch (left-padded prompts, right-padded completions of different lengths) ...
        prompts, ids, mask, cut = trainer.encode(rows, [0, 1, 2])
        nll, count = trainer.loss(prompts, ids, mask), int(mask.sum())
        # ... equals the sum of three independent single-row computations.
        expected = [_independent_sft_nll(trainer.model, processor, row) for row in rows]
    assert count == sum(n for _, n in expected) and cut == 0
    assert float(nll) == pytest.approx(float(sum(e for e, _ in expected)), rel=1e-5)

    # Which tokens count depends on the completion only: completion tokens + <|im_end|>, whatever the prompt.
    tokenizer = processor.tokenizer
    row = rows[0]
    longer = {**row, "question": row["question"] + " Look closely at the nuclei and at the stroma around them."}
    longer["prompt"] = build_messages(longer)
    lengths = encode_prompts(family_for(*tiny_parts), [row, longer], [0, 1], 4096).attention_mask.sum(1).tolist()
    assert lengths[1] > lengths[0]
    with torch.no_grad():
        count_short = int(trainer.encode([row], [0])[2].sum())
        count_long = int(trainer.encode([longer], [0])[2].sum())
    assert count_short == count_long == len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1


def test_sft_targets_cut_to_the_length_limit_are_counted(tiny_parts):
    tokenizer = tiny_parts[1].tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    family = family_for(*tiny_parts)
    assert family.end_of_turn_id == end  # read from the chat template
    rows = [{"prompt": [{"role": "user", "content": "Why?"}], "completion": text}
            for text in ("<think>a long piece of reasoning</think>", "ok")]
    ids, mask, cut = encode_targets(family, rows, [0, 1], 5)
    assert cut == 1 and ids.shape == (2, 5) and int(ids[0, 4]) == end  # the cut target still ends its turn
    assert mask[1].sum() == len(tokenizer("ok", add_special_tokens=False)["input_ids"]) + 1


def test_a_fresh_run_never_replaces_an_earlier_one_unless_asked(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:4]]

    def run(**overrides):
        settings = dict(output_dir=str(tmp_path), batch_size=2, micro_batch_size=2, max_steps=2, save_steps=1,
                        max_completion_length=16)
        cfg = SFTConfig(**{**settings, **overrides})
        return SFTTrainer(copy.deepcopy(model), processor, rows, cfg).train()

    run()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-1, checkpoint-2, metrics.jsonl\).*overwrite_output_dir"):
        run(max_steps=1)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2  # nothing of the first run was touched
    run(max_steps=1, overwrite_output_dir=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "metrics.jsonl"]  # no stale checkpoint-2 left
    run(max_steps=2, resume_from_checkpoint="latest")  # resuming is not a fresh run
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------- learning


def test_sft_learns_the_toy_targets(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:32]]
    before = state(model)
    cfg = SFTConfig(output_dir=str(tmp_path), batch_size=8, micro_batch_size=8, learning_rate=3e-3, max_steps=30,
                    freeze_vision_tower=False, save_steps=0)
    trainer = SFTTrainer(copy.deepcopy(model), processor, rows, cfg)
    losses = [m["loss"] for m in trainer.train()]
    first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    assert first > 5.0  # about ln(vocab): the random model knows nothing
    assert last < 0.6 * first, losses
    # With freeze_vision_tower=False the vision tower trains too.
    visual = {name: value for name, value in state(trainer.model).items() if ".visual." in f".{name}"}
    assert visual and all(not torch.equal(value, before[name]) for name, value in visual.items())


@pytest.mark.parametrize("reward", [vowel_fraction, fewer_vowels])
def test_grpo_raises_the_reward(tiny_parts, toy_rows, tmp_path, reward):
    """Rewarding vowels raises their share and rewarding their absence lowers it: the update follows
    the reward's sign, it is not a drift of the random model."""
    model, processor = tiny_parts
    cfg = small_config(tmp_path, group_size=4, prompts_per_step=4, completions_per_micro_batch=16, temperature=1.0,
                       beta=0.0, learning_rate=1e-2, max_steps=20, log_completions=0)
    rewards = [m["reward"] for m in Trainer(copy.deepcopy(model), processor, [reward], toy_rows[:32], cfg).train()]
    assert statistics.mean(rewards[-3:]) > statistics.mean(rewards[:3]) + 0.1, rewards


# ---------------------------------------------------------------- evaluate


def test_evaluate_scores_greedy_completions_and_writes_them(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    model = copy.deepcopy(model).train()
    rows = toy_rows[:6]
    out = tmp_path / "eval" / "records.jsonl"
    result = evaluate(model, processor, rows, [vowel_fraction, format_reward], batch_size=4,
                      max_completion_length=12, output_path=str(out))
    records = result["records"]
    completions = [r["completion"] for r in records]
    assert len(records) == 6 and model.training  # the caller's mode is restored
    assert result["vowel_fraction"] == pytest.approx(statistics.mean(vowel_fraction(None, completions)))
    assert "accuracy" not in result  # neither reward measures correctness (tests/test_evaluate_accuracy.py)
    assert result["format_reward"] == pytest.approx(statistics.mean(format_reward(None, completions)))
    assert all(1 <= r["tokens"] <= 12 for r in records)
    assert result["mean_completion_tokens"] == pytest.approx(statistics.mean(r["tokens"] for r in records))
    assert read_jsonl(out) == records

    # Greedy: the same completions again, with a different batching (so different left padding) too.
    again = evaluate(model, processor, rows, [vowel_fraction, format_reward], batch_size=6, max_completion_length=12)
    assert [r["completion"] for r in again["records"]] == completions
    assert again["vowel_fraction"] == result["vowel_fraction"]


def test_evaluate_accuracy_is_the_accuracy_function_whatever_the_order(tiny_parts, toy_rows):
    model, processor = tiny_parts

    def letter_accuracy(prompts, completions, **columns):
        return [0.25] * len(completions)

    letter_accuracy.is_accuracy = True
    result = evaluate(model, processor, toy_rows[:2], [format_reward, letter_accuracy], max_completion_length=4)
    assert result["accuracy"] == 0.25 and result["format_reward"] == 0.0


def test_evaluate_refuses_rows_sharing_an_id(tiny_parts, toy_rows):
    model, processor = tiny_parts
    rows = [dict(row) for row in toy_rows[:3]]
    rows[2]["id"] = rows[0]["id"]
    with pytest.raises(ValueError, match=r"rows 0 and 2 have the same id"):
        evaluate(model, processor, rows, [format_reward], max_completion_length=4)
