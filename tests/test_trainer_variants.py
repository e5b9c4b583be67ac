"""The objective variants inside the trainer, on the tiny Qwen2.5-VL.

What a user relies on: DAPO's dynamic sampling drops exactly the groups whose rewards are all equal
and refills the step with informative ones (the data a function of the step), and says when it ran
out of rounds; the 80/20 entropy mask reaches the update; reward functions see each completion's
token ids (`rewards.overlong_penalty` works in training and evaluation); the config refuses
nonsense naming the field.
"""

import copy
import json

import pytest
import torch

from grpo import GRPOConfig, Trainer, evaluate
from grpo.dynamic_sampling import refill_row_indices
from grpo.objective import grpo_loss
from grpo.run import step_row_indices
from rewards import overlong_penalty

G = 2


def rows_with_constant_rewards(toy_rows, constant):
    """Toy rows carrying a `constant` column: the reward below gives their groups no spread."""
    return [{**row, "constant": index in constant} for index, row in enumerate(toy_rows)]


def spread_unless_constant(prompts, completions, constant, **columns):
    """0.5 for every completion of a `constant` row; 0, 1, 0, 1... by position otherwise (a spread in
    every group of G = 2, whatever was sampled)."""
    return [0.5 if c else float(i % 2) for i, c in enumerate(constant)]


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), group_size=G, prompts_per_step=4, completions_per_micro_batch=4,
                    max_completion_length=6, learning_rate=1e-3, max_steps=2, save_steps=0, seed=0, beta=0.0,
                    log_completions=8)
    settings.update(overrides)
    return GRPOConfig(**settings)


def trained_rows(tmp_path):
    """Per step, the dataset ids of the groups trained (completions.jsonl logs all 8 completions)."""
    steps = {}
    for line in (tmp_path / "completions.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], []).append(record["id"])
    return {step: ids[::G] for step, ids in steps.items()}


def test_dynamic_sampling_drops_exactly_the_zero_spread_groups_and_refills_the_step(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = rows_with_constant_rewards(toy_rows[:16], constant=set(range(0, 16, 2)) | {3, 5})
    cfg = config(tmp_path, dynamic_sampling=True, max_sampling_rounds=6)
    history = Trainer(copy.deepcopy(model), processor, [spread_unless_constant], rows, cfg).train()
    for step, (record, ids) in enumerate(zip(history, trained_rows(tmp_path).values())):
        # The rows sampled, round by round, as the data order defines them (a function of the step).
        sampled = step_row_indices(16, step, 4, 0)
        for round_ in range(1, record["dynamic_sampling/rounds"]):
            sampled += refill_row_indices(16, step, round_, 4, 0, list(sampled))
        informative = [i for i in sampled if not rows[i]["constant"]]
        assert len(informative) >= 4 and len([i for i in sampled[:-4] if not rows[i]["constant"]]) < 4  # no round too many
        assert ids == [rows[i]["id"] for i in sorted(informative[:4], key=sampled.index)]
        assert record["dynamic_sampling/informative_groups"] == 4
        assert record["dynamic_sampling/groups_dropped"] == len(sampled) - len(informative)
        assert record["dynamic_sampling/extra_rollouts"] == (record["dynamic_sampling/rounds"] - 1) * 4 * G
        assert record["frac_reward_zero_std"] == 0.0 and record["reward"] == pytest.approx(0.5)
    assert max(r["dynamic_sampling/rounds"] for r in history) > 1, "the test must need a refill"
    assert sum(r["dynamic_sampling/groups_dropped"] for r in history) > 0


def test_dynamic_sampling_out_of_rounds_trains_what_it_found_and_says_so(tiny_parts, toy_rows, tmp_path, capsys):
    model, processor = tiny_parts
    rows = rows_with_constant_rewards(toy_rows[:16], constant=set(range(16)) - {7})
    cfg = config(tmp_path, dynamic_sampling=True, max_sampling_rounds=2, max_steps=1)
    (record,) = Trainer(copy.deepcopy(model), processor, [spread_unless_constant], rows, cfg).train()
    sampled = step_row_indices(16, 0, 4, 0)
    sampled += refill_row_indices(16, 0, 1, 4, 0, list(sampled))
    found = int(7 in sampled)
    assert record["dynamic_sampling/rounds"] == 2 and record["dynamic_sampling/informative_groups"] == found
    # The batch keeps its size (equal micro-batch counts on every process): topped up with zero-spread groups.
    (ids,) = trained_rows(tmp_path).values()
    assert len(ids) == 4 and record["dynamic_sampling/groups_dropped"] == 8 - found - (4 - found)
    assert f"dynamic sampling found {found} groups with a reward spread in 2 rounds" in capsys.readouterr().err


def test_without_dynamic_sampling_nothing_changes(tiny_parts, toy_rows, tmp_path):
    """All groups informative: dynamic sampling keeps the first round as sampled, the very same run."""
    model, processor = tiny_parts
    rows = rows_with_constant_rewards(toy_rows[:16], constant=set())
    runs = [Trainer(copy.deepcopy(model), processor, [spread_unless_constant], rows,
                    config(tmp_path / str(flag), dynamic_sampling=flag)).train() for flag in (False, True)]
    for plain, dynamic in zip(*runs):
        assert dynamic.pop("dynamic_sampling/rounds") == 1 and dynamic.pop("dynamic_sampling/groups_dropped") == 0
        assert dynamic.pop("dynamic_sampling/extra_rollouts") == 0 and dynamic.pop("dynamic_sampling/informative_groups") == 4
        for key in ("step_time", "tokens_per_sec"):
            plain.pop(key), dynamic.pop(key)
        assert dynamic == plain


def test_high_entropy_mask_reaches_the_update(tiny_parts, toy_rows, tmp_path):
    """top_entropy_fraction=0.2: the step's token mask keeps the top 20% of the rollout policy's
    token entropies, and the update's loss is grpo_loss with that mask."""
    model, processor = tiny_parts
    rows = rows_with_constant_rewards(toy_rows[:16], constant=set())
    cfg = config(tmp_path, top_entropy_fraction=0.2, max_completion_length=8, beta=0.04, max_steps=1)
    trainer = Trainer(copy.deepcopy(model), processor, [spread_unless_constant], rows, cfg)
    seen = {}
    update = trainer.update

    def recording_update(batch, advantages):
        seen.update(batch=batch, advantages=advantages, state=copy.deepcopy(trainer.model.state_dict()))
        return update(batch, advantages)

    trainer.update = recording_update
    (record,) = trainer.train()
    batch = seen["batch"]
    mask = batch.completion_mask.bool()
    entropies = batch.entropies[mask]
    kept = batch.token_mask
    assert not (kept & ~mask).any() and entropies.min() < entropies.max()
    assert entropies[kept[mask]].min() >= entropies[~kept[mask]].max()  # the kept ones are the highest
    assert int(kept.sum()) == int(mask.sum()) - int(torch.tensor(0.8 * (int(mask.sum()) - 1)).ceil())
    assert record["entropy_mask_frac"] == pytest.approx(float(kept.sum() / mask.sum()))
    assert record["entropy"] == pytest.approx(float(entropies.mean()), rel=1e-5)
    # The logged loss is grpo_loss on the whole step with that token mask (one micro-batch of 8).
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(seen["state"])
    trainer.model.load_state_dict(seen["state"])
    with torch.no_grad():
        logprobs = trainer._logprobs_all(trainer.model, batch)
    loss, _ = grpo_loss(logprobs, logprobs, seen["advantages"], mask, ref_logprobs=batch.ref_logprobs, beta=0.04,
                        token_mask=kept)
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    unmasked, _ = grpo_loss(logprobs, logprobs, seen["advantages"], mask, ref_logprobs=batch.ref_logprobs, beta=0.04)
    assert abs(unmasked.item() - loss.item()) > 1e-3


def test_reward_functions_get_each_completions_token_ids(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    seen = []

    def record_ids(prompts, completions, completion_ids, **columns):
        seen.append(completion_ids)
        return [0.0] * len(completions)

    penalty = overlong_penalty(6, 4)  # 0 up to 2 tokens, -1 at 6
    cfg = config(tmp_path, max_steps=1, log_completions=0)
    trainer = Trainer(copy.deepcopy(model), processor, [record_ids, penalty], toy_rows[:8], cfg)
    trainer.family.eos_ids = list(range(0, len(processor.tokenizer), 5))  # the random model then stops anywhere
    trainer.train()
    ((ids),) = seen
    lengths = [len(i) for i in ids]
    assert len(ids) == 8 and all(1 <= n <= 6 for n in lengths) and len(set(lengths)) > 1
    want = [min(0.0, (2 - n) / 4) for n in lengths]
    assert penalty(None, [""] * 8, completion_ids=ids) == want
    result = evaluate(model, processor, toy_rows[:3], [penalty], max_completion_length=6)
    assert [r["overlong_penalty"] for r in result["records"]] == [min(0.0, (2 - r["tokens"]) / 4) for r in result["records"]]
    with pytest.raises(ValueError, match="field 'completion_ids'"):
        Trainer(copy.deepcopy(model), processor, [record_ids], [{**row, "completion_ids": 1} for row in toy_rows[:8]],
                config(tmp_path / "clash", max_steps=1)).train()


@pytest.mark.parametrize("settings, message", [
    (dict(cispo_max_ratio=0.0, policy_loss="cispo"), "cispo_max_ratio must be > 0"),
    (dict(top_entropy_fraction=0.0), r"top_entropy_fraction must be in \(0, 1\]"),
    (dict(top_entropy_fraction=1.2), r"top_entropy_fraction must be in \(0, 1\]"),
    (dict(delta=1.28, epsilon_high=0.28), r"delta must be > 1 \+ epsilon_high = 1.28"),
    (dict(delta=1.1), r"delta must be > 1 \+ epsilon_high = 1.2"),
    (dict(policy_loss="gspo"), "unknown policy_loss 'gspo'; valid: clip, cispo, sapo"),
    (dict(importance_sampling_level="seq"), "unknown importance_sampling_level 'seq'; valid: token, sequence"),
    (dict(advantage_estimator="gae"), "unknown advantage_estimator 'gae'; valid: grpo, rloo"),
    (dict(max_sampling_rounds=0), "max_sampling_rounds must be >= 1"),
    (dict(sapo_temperature_pos=-1.0), "sapo_temperature_pos must be > 0"),
])
def test_config_refuses_nonsense_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**settings)


def test_config_defaults_are_the_papers_objective():
    cfg = GRPOConfig()
    assert (cfg.policy_loss, cfg.importance_sampling_level, cfg.delta, cfg.advantage_estimator) == ("clip", "token", None, "grpo")
    assert (cfg.cispo_max_ratio, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg) == (5.0, 1.0, 1.05)
    assert (cfg.top_entropy_fraction, cfg.dynamic_sampling, cfg.max_sampling_rounds) == (1.0, False, 3)


def test_a_resumed_dynamic_sampling_run_equals_the_uninterrupted_run(tiny_parts, toy_rows, tmp_path):
    """The refill rounds' rows and sampling seeds are functions of the step: resuming replays them."""
    model, processor = tiny_parts
    rows = rows_with_constant_rewards(toy_rows[:16], constant=set(range(0, 16, 2)))
    settings = dict(dynamic_sampling=True, max_sampling_rounds=4, max_steps=3, save_steps=1, log_completions=0)
    full = Trainer(copy.deepcopy(model), processor, [spread_unless_constant], rows,
                   config(tmp_path / "full", **settings)).train()
    (tmp_path / "resumed").mkdir()
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    resumed = Trainer(copy.deepcopy(model), processor, [spread_unless_constant], rows,
                      config(tmp_path / "resumed", resume_from_checkpoint="latest", **settings)).train()
    volatile = ("step_time", "tokens_per_sec")
    assert [{k: v for k, v in r.items() if k not in volatile} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in volatile} for r in full[1:]]
    assert sum(r["dynamic_sampling/rounds"] for r in full) > 3  # refills happened
