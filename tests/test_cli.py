"""`python -m grpo`: SFT, GRPO (with the user's own rewards), resume and evaluation on a JSONL file of the
toy data with the tiny model saved to a directory; `--help` lists every key; bad config files are errors
naming the key and the file."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from grpo import GRPOConfig, SFTConfig
from grpo.cli import DataConfig, EvaluateConfig, PromptConfig, RunConfig, build_rewards, load_rows, load_run, main

REWARDS_MODULE = '''
def brevity(prompts, completions, **columns):
    return [1.0 / (1 + len(c)) for c in completions]


class LengthCap:
    def __init__(self, limit):
        self.limit = limit
        self.__name__ = "length_cap"

    def __call__(self, prompts, completions, family, **columns):
        assert all(f == "stain" or f for f in family)  # JSONL fields arrive as columns
        return [float(len(c) <= self.limit) for c in completions]
'''


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def workspace(tiny_parts, toy_rows, tmp_path_factory):
    """The tiny model in a directory, the toy rows as a JSONL file with PNG images, a rewards module, run.yaml."""
    root = tmp_path_factory.mktemp("cli")
    model, processor = tiny_parts
    model.save_pretrained(str(root / "tiny"))
    processor.save_pretrained(str(root / "tiny"))
    os.makedirs(root / "data" / "images")
    for name, rows in (("train", toy_rows[:8]), ("eval", toy_rows[8:10])):
        with open(root / "data" / f"{name}.jsonl", "w") as f:
            for row in rows:
                row["image"].save(root / "data" / "images" / f"{row['id']}.png")
                item = {key: row[key] for key in ("id", "question", "options", "solution", "explanation", "family")}
                f.write(json.dumps({**item, "image": f"images/{row['id']}.png"}) + "\n")
    (root / "my_rewards.py").write_text(REWARDS_MODULE)
    config = {
        "model": str(root / "tiny"),
        "data": {"train": {"loader": "jsonl", "path": str(root / "data" / "train.jsonl"), "max_pixels": 3136},
                 "eval": str(root / "data" / "eval.jsonl")},
        "rewards": {"format": 1.0, "accuracy": {"weight": 1.0, "mode": "option"}, "my_rewards:brevity": 0.5,
                    "my_rewards:LengthCap": {"weight": 0.25, "limit": 4}},
        "grpo": {"output_dir": str(root / "grpo"), "group_size": 2, "prompts_per_step": 2, "completions_per_micro_batch": 4,
                 "max_completion_length": 6, "max_steps": 2, "save_steps": 1, "learning_rate": 1e-3, "eval_steps": 2,
                 "eval_batch_size": 2},
        "sft": {"output_dir": str(root / "sft"), "batch_size": 2, "micro_batch_size": 2, "max_completion_length": 16,
                "max_steps": 2, "save_steps": 0, "learning_rate": 1e-3},
        "evaluate": {"output_dir": str(root / "eval"), "batch_size": 2, "max_completion_length": 6},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return root, str(path)


def test_cli_trains_sft_then_grpo_with_own_rewards_resumes_and_evaluates(workspace):
    root, config = workspace
    sft = main(["sft", "--config", config])
    assert [r["step"] for r in read_jsonl(root / "sft" / "metrics.jsonl")] == [1, 2]
    assert (root / "sft" / "checkpoint-2" / "config.json").is_file() and (root / "sft" / "run_config.yaml").is_file()
    assert sft.train_dataset[0]["completion"].startswith("<think>")  # the think/answer target from the explanation

    grpo = main(["grpo", "--config", config, "--set", f"model={root / 'sft'}"])  # a run directory: its latest checkpoint
    assert [f.__name__ for f in grpo.reward_funcs] == ["format_reward", "accuracy_reward", "brevity", "length_cap"]
    assert grpo.reward_weights == [1.0, 1.0, 0.5, 0.25]
    metrics = read_jsonl(root / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2] and "rewards/length_cap/mean" in metrics[0]
    assert "eval/accuracy" in metrics[1] and "eval/accuracy" not in metrics[0]
    with open(root / "grpo" / "run_config.yaml") as f:
        assert yaml.safe_load(f)["model"] == str(root / "sft")  # what was run, overrides included

    resumed = main(["grpo", "--config", config, "--set", f"model={root / 'sft'}", "--set", "grpo.max_steps=3",
                    "--set", "grpo.resume_from_checkpoint=latest"])
    assert resumed.step == 3
    assert [r["step"] for r in read_jsonl(root / "grpo" / "metrics.jsonl")] == [1, 2, 3]

    result = main(["evaluate", "--config", config, "--set", f"model={root / 'grpo'}"])
    records = read_jsonl(root / "eval" / "records.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in read_jsonl(root / "data" / "eval.jsonl")]
    with open(root / "eval" / "summary.json") as f:
        summary = json.load(f)
    assert summary["model"] == str(root / "grpo" / "checkpoint-3") and summary["rows"] == 2
    assert summary["accuracy"] == result["accuracy"] == sum(r["accuracy_reward"] for r in records) / 2
    assert summary["brevity"] == pytest.approx(sum(1 / (1 + len(r["completion"])) for r in records) / 2)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cls in (RunConfig, DataConfig, PromptConfig, GRPOConfig, SFTConfig, EvaluateConfig):
        for f in dataclasses.fields(cls):
            assert f"\n  {f.name}: " in text or f"\n{f.name}: " in text, (cls.__name__, f.name)
    for name in ("format", "accuracy", "judge", "module:function", "jsonl", "pathmmu", "toy", "limit"):
        assert name in text


def write(tmp_path, config, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_bad_config_files_are_errors_naming_the_key_and_the_file(workspace, tmp_path):
    root, _ = workspace
    good = {"model": str(root / "tiny"), "data": {"train": str(root / "data" / "train.jsonl")}}
    cases = [
        ({**good, "rewads": {"format": 1}}, ValueError, r"unknown key 'rewads'; did you mean 'rewards'"),
        ({**good, "grpo": {"max_step": 3}}, ValueError, r"\[grpo\] \(GRPOConfig\): unknown key 'max_step'"),
        ({**good, "grpo": {"max_steps": "many"}}, ValueError, r"\[grpo\] \(GRPOConfig\): max_steps must be int, got 'many'"),
        ({**good, "sft": {"report_to": ["tensorbord"]}}, ValueError, r"\[sft\].*unknown tracker 'tensorbord'"),
        ({**good, "evaluate": {"batch_size": [2]}}, ValueError, r"\[evaluate\].*batch_size must be int"),
        ({**good, "data": {"train": 3}}, ValueError, r"\[data\] \(DataConfig\): train must be"),
    ]
    for config, error, message in cases:
        path = write(tmp_path, config)
        with pytest.raises(error, match=f"{path}.*{message}"):
            load_run(path)
    with pytest.raises(FileNotFoundError, match="nowhere.yaml: config file not found"):
        load_run(str(tmp_path / "nowhere.yaml"))

    def run_with(**sections):
        return load_run(write(tmp_path, {**good, **sections}))

    path = str(tmp_path / "run.yaml")
    with pytest.raises(FileNotFoundError, match=rf"{path} \[data.train\]: .*missing.jsonl: JSONL file not found"):
        load_rows(run_with(data={"train": str(tmp_path / "missing.jsonl")}), "train")
    with pytest.raises(ValueError, match=rf"{path} \[data.train\] \(loader 'jsonl'.*unknown key 'pixels'"):
        load_rows(run_with(data={"train": {"path": "x.jsonl", "pixels": 3}}), "train")
    with pytest.raises(ValueError, match=rf"{path} \[data.train\] loader: unknown key 'pathmu'; did you mean 'pathmmu'"):
        load_rows(run_with(data={"train": {"loader": "pathmu", "root": "x"}}), "train")
    with pytest.raises(ValueError, match=rf"{path} \[prompt.system\].*unknown key 'pathologi'"):
        load_rows(run_with(prompt={"system": "pathologi"}), "train")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": 1, "image": "x.png", "question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path} \[data.train\]: .*bad.jsonl: line 1: field 'solution'"):
        load_rows(run_with(data={"train": str(tmp_path / "bad.jsonl")}), "train")

    with pytest.raises(ValueError, match=rf"{path} \[rewards\]: unknown key 'acuracy'; did you mean 'accuracy'"):
        build_rewards(run_with(rewards={"acuracy": 1}))
    with pytest.raises(ValueError, match=rf"{path} \[rewards.accuracy\]: .*modes.*its settings: mode"):
        build_rewards(run_with(rewards={"accuracy": {"modes": "letter"}}))
    with pytest.raises(ValueError, match=rf"{path} \[rewards.format\]: weight must be a number"):
        build_rewards(run_with(rewards={"format": {"weight": "high"}}))
    with pytest.raises(ImportError, match=rf"{path} \[rewards.no_such_module:f\]: cannot import 'no_such_module'"):
        build_rewards(run_with(rewards={"no_such_module:f": 1}))
    (tmp_path / "my_module.py").write_text("def f(prompts, completions, **c):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ValueError, match=rf"{path} \[rewards.my_module:g\]: module 'my_module' .* has no 'g'"):
        build_rewards(run_with(rewards={"my_module:g": 1}))
    funcs, weights = build_rewards(run_with(rewards={"my_module:f": 2}))  # found beside the config file
    assert funcs[0].__name__ == "f" and weights == [2.0]


def test_the_library_imports_neither_data_nor_rewards():
    code = ("import sys, grpo, grpo.cli, grpo.plot, grpo.tracking, grpo.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('data', 'rewards')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"
