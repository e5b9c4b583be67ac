"""Which reward is "accuracy": the one named, else the first marked `is_accuracy` (the accuracy and answer
rewards), never the format reward; with none, no accuracy is reported. Same rule for `evaluate`, GRPO's
eval/accuracy and the command line."""

import copy
import importlib

import pytest
import yaml

from grpo import GRPOConfig, Trainer, evaluate
from grpo.cli import _accuracy, build_rewards, load_run
from grpo.evaluate import accuracy_name
from rewards import AccuracyReward, AnswerReward, JudgeReward, accuracy_reward, answer_reward, format_reward


def formatted_half_right(rows):
    """Completions in the think/answer format (format reward 1) answering rows 0, 2, 4, ... right and the
    others with another option (answer reward 0): the answer reward's mean is 0.5 for an even count."""
    texts = []
    for index, row in enumerate(rows):
        wrong = next(option for option in row["options"] if option != row["solution"])
        texts.append(f"<think>Looking at the tile.</think><answer>{row['solution'] if index % 2 == 0 else wrong}</answer>")
    return texts


@pytest.fixture
def scripted_completions(monkeypatch):
    """grpo.evaluate decodes `formatted_half_right(rows)` (in dataset order) instead of the random model's text."""
    module = importlib.import_module("grpo.evaluate")  # the module: `grpo.evaluate` the attribute is the function

    def use(rows):
        pending = iter(formatted_half_right(rows))
        monkeypatch.setattr(module, "decode_completions", lambda family, out: [next(pending) for _ in range(len(out.ids))])

    return use


def test_the_accuracy_reward_is_the_named_one_else_the_first_marked_never_format():
    def judge_like(prompts, completions, **columns):
        return [0.0] * len(completions)

    def own_accuracy(prompts, completions, **columns):
        return [1.0] * len(completions)

    own_accuracy.is_accuracy = True
    assert accuracy_name([format_reward, answer_reward]) == "answer_reward"
    assert accuracy_name([format_reward, accuracy_reward, answer_reward]) == "accuracy_reward"  # the first marked
    assert accuracy_name([format_reward, AccuracyReward("letter")]) == "accuracy_reward_letter"
    assert accuracy_name([judge_like, own_accuracy]) == "own_accuracy"
    assert accuracy_name([format_reward]) is None
    assert accuracy_name([format_reward, judge_like, JudgeReward(base_url="http://localhost:1", model="m")]) is None
    # Partial credit scores open answers by token F1: a training signal, not correctness.
    assert accuracy_name([format_reward, AnswerReward(open_partial_credit=True)]) is None
    assert accuracy_name([format_reward, answer_reward], accuracy="format_reward") == "format_reward"
    with pytest.raises(ValueError, match=r"accuracy='answer' is not one of the reward functions; valid: format_reward, "
                                         r"answer_reward"):
        accuracy_name([format_reward, answer_reward], accuracy="answer")


def test_evaluate_reports_the_answer_reward_as_accuracy_not_the_format_reward(tiny_parts, toy_rows, scripted_completions):
    model, processor = tiny_parts
    rows = toy_rows[:6]
    scripted_completions(rows)
    result = evaluate(model, processor, rows, [format_reward, answer_reward], batch_size=4, max_completion_length=4)
    records = result["records"]
    assert [r["format_reward"] for r in records] == [1.0] * 6
    assert [r["answer_reward"] for r in records] == [1.0, 0.0] * 3
    assert result["format_reward"] == 1.0
    assert result["accuracy"] == result["answer_reward"] == pytest.approx(0.5)


def test_evaluate_without_an_accuracy_reward_reports_none(tiny_parts, toy_rows, scripted_completions, capsys):
    model, processor = tiny_parts
    rows = toy_rows[:4]
    scripted_completions(rows)
    result = evaluate(model, processor, rows, [format_reward], max_completion_length=4, progress="eval")
    assert "accuracy" not in result and result["format_reward"] == 1.0
    progress = capsys.readouterr().err
    assert "[eval] step 4/4" in progress and "accuracy" not in progress


def test_evaluate_accuracy_named_explicitly(tiny_parts, toy_rows, scripted_completions):
    model, processor = tiny_parts
    rows = toy_rows[:4]
    scripted_completions(rows)
    result = evaluate(model, processor, rows, [format_reward, answer_reward], max_completion_length=4,
                      accuracy="format_reward")
    assert result["accuracy"] == result["format_reward"] == 1.0 and result["answer_reward"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"accuracy='answer' is not one of .* valid: format_reward, answer_reward"):
        evaluate(model, processor, rows, [format_reward, answer_reward], max_completion_length=4, accuracy="answer")


def grpo_trainer(tiny_parts, toy_rows, tmp_path, funcs, **overrides):
    model, processor = tiny_parts
    settings = dict(group_size=2, prompts_per_step=2, completions_per_micro_batch=4, max_completion_length=4,
                    max_steps=1, save_steps=0, eval_steps=1, eval_batch_size=4, log_completions=0, beta=0.0)
    config = GRPOConfig(output_dir=str(tmp_path), **{**settings, **overrides})
    return Trainer(copy.deepcopy(model), processor, funcs, toy_rows[:8], config, eval_dataset=toy_rows[8:12])


def test_grpo_eval_accuracy_follows_the_same_rule(tiny_parts, toy_rows, tmp_path, scripted_completions):
    funcs = [format_reward, answer_reward]
    scripted_completions(toy_rows[8:12])
    found = grpo_trainer(tiny_parts, toy_rows, tmp_path / "found", funcs).evaluate()
    assert found["eval/accuracy"] == found["eval/answer_reward"] == pytest.approx(0.5)
    assert found["eval/format_reward"] == 1.0

    scripted_completions(toy_rows[8:12])
    named = grpo_trainer(tiny_parts, toy_rows, tmp_path / "named", funcs, accuracy="format_reward").evaluate()
    assert named["eval/accuracy"] == named["eval/format_reward"] == 1.0

    # A misspelt name is refused when the trainer is built, not at the first evaluation.
    with pytest.raises(ValueError, match=r"accuracy='answer' is not one of .* valid: format_reward, answer_reward"):
        grpo_trainer(tiny_parts, toy_rows, tmp_path / "bad", funcs, accuracy="answer")


def test_grpo_without_an_accuracy_reward_logs_and_shows_none(tiny_parts, toy_rows, tmp_path, capsys):
    history = grpo_trainer(tiny_parts, toy_rows, tmp_path, [format_reward]).train()
    assert "eval/format_reward" in history[-1] and "eval/accuracy" not in history[-1]
    assert "accuracy" not in history[-1]  # nor a training accuracy
    assert "eval acc" not in capsys.readouterr().err  # the progress line shows no accuracy


def test_command_line_accuracy_by_reward_key_or_name(tmp_path):
    def run_with(section: str, accuracy: str):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"model": "unused", "rewards": {"format": 1.0, "answer": 1.0},
                                        section: {"accuracy": accuracy}}, sort_keys=False))
        run = load_run(str(path))
        return run, build_rewards(run)[0]

    for section in ("evaluate", "grpo"):
        assert _accuracy(*run_with(section, "answer"), section) == "answer_reward"  # its key under rewards:
        assert _accuracy(*run_with(section, "format_reward"), section) == "format_reward"  # its own name
        with pytest.raises(ValueError, match=rf"run.yaml \[{section}.accuracy\]: accuracy='anwser' .* valid: "
                                             r"format_reward, answer_reward \(or their keys under rewards: format, answer\)"):
            _accuracy(*run_with(section, "anwser"), section)


def test_training_accuracy_is_logged_and_plotted_by_the_same_rule(tiny_parts, toy_rows, tmp_path):
    from grpo.plot import panels_of

    history = grpo_trainer(tiny_parts, toy_rows, tmp_path / "answer", [format_reward, answer_reward], max_steps=2).train()
    assert [h["accuracy"] for h in history] == [h["rewards/answer_reward/mean"] for h in history]
    assert ("accuracy", " train") in panels_of(history)["accuracy"]  # answer_reward has no "accuracy" in its name
    named = grpo_trainer(tiny_parts, toy_rows, tmp_path / "named", [format_reward, answer_reward],
                         accuracy="format_reward").train()
    assert named[-1]["accuracy"] == named[-1]["rewards/format_reward/mean"]
