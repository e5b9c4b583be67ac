"""The PathVLM-R1 reproduction, dry-run end to end: every paper config for 2 steps on fixture data.

The configs are used as shipped, only made small with --set (tiny model, lengths, steps); each stage
starts from the checkpoint the previous stage wrote, then the evaluation CLI writes Tables 1-3 and
resumes an interrupted evaluation without decoding finished items again.
"""

import importlib.util
import json
import os

import pytest
import torch
from dataset_trees import write_omnimedvqa, write_pathmmu

from grpo.config import load_yaml
from grpo.loading import load_model
from rewards import accuracy_reward, format_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "examples", "pathvlm_r1")
CONFIGS = os.path.join(SCRIPTS, "configs")
# In the order examples/pathvlm_r1/README.md runs them: each stage reads the one before it.
STAGES = [("alpha", "sft"), ("beta", "grpo"), ("r1", "grpo"), ("gamma", "sft"), ("delta", "sft"), ("epsilon", "grpo")]
# One process without DeepSpeed, in float32 (the shipped configs say zero3 + bf16 for GPUs; the
# DeepSpeed path itself is tested under torchrun in test_distributed.py).
SMALL = {
    "sft": ["sft.max_steps=2", "sft.batch_size=2", "sft.micro_batch_size=2", "sft.warmup_steps=0",
            "sft.max_completion_length=16", "sft.max_prompt_length=4096", "sft.deepspeed=null", "sft.dtype=float32"],
    "grpo": ["grpo.max_steps=2", "grpo.prompts_per_step=2", "grpo.completions_per_micro_batch=8",
             "grpo.max_completion_length=8", "grpo.max_prompt_length=4096", "grpo.deepspeed=null", "grpo.dtype=float32"],
}
DATA = ["data.on_bad_item=skip", "data.max_pixels=3136"]


def script(name):
    spec = importlib.util.spec_from_file_location(f"pathvlm_r1_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_weights(path):
    # Through from_pretrained: the file's key names differ from the module's (transformers maps them).
    return weights(load_model(path, "float32"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_parts):
    """A working directory laid out as examples/pathvlm_r1/README.md's: data/PathMMU, data/OmniMedVQA, a tiny model."""
    root = tmp_path_factory.mktemp("repro")
    write_pathmmu(str(root / "data" / "PathMMU"))
    write_omnimedvqa(str(root / "data" / "OmniMedVQA"))
    model, processor = tiny_parts
    model.save_pretrained(str(root / "tiny"))
    processor.save_pretrained(str(root / "tiny"))
    return root


@pytest.fixture
def judge_url():
    """A chat-completions endpoint that grades every reasoning (0.8, 0.6): reward 0.7."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            content = json.dumps({"integrity_score": 0.8, "knowledge_score": 0.6})
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_paper_config_runs_in_order_then_evaluation_writes_the_tables(workdir, monkeypatch, capsys, judge_url, decoded_batches):
    monkeypatch.chdir(workdir)
    tiny = str(workdir / "tiny")
    script("split").main(["--sizes", "12", "6", "6", "--on-bad-item", "skip"])
    manifest = json.loads((workdir / "splits" / "pathmmu_paper_seed0.json").read_text())
    assert [len(manifest["parts"][p]) for p in ("sft", "rl", "test")] == [12, 6, 6]
    with pytest.raises(SystemExit, match="never overwritten"):
        script("split").main(["--sizes", "12", "6", "6"])
    sft, grpo = script("sft"), script("grpo")

    for size in ("7b", "3b"):
        for stage, kind in STAGES:
            config_path = os.path.join(CONFIGS, f"{stage}_{size}.yaml")
            config = load_yaml(config_path)
            overrides = SMALL[kind] + DATA
            if not config["model"].startswith("runs/"):
                overrides.append(f"model={tiny}")  # the base model
            if stage == "r1":
                assert config["judge"]["model"] == "gpt-4o"
                # The shipped judge section, pointed at a loopback stand-in for GPT-4o.
                overrides += [f"judge.base_url={judge_url}", "judge.api_key=not-a-secret"]
            expected_init = (os.path.join(config["model"], "checkpoint-2") if config["model"].startswith("runs/") else tiny)
            capsys.readouterr()
            trainer = (sft if kind == "sft" else grpo).main(["--config", config_path, *[f"--set={o}" for o in overrides]])
            output_dir = config[kind]["output_dir"]
            assert output_dir == f"runs/pathvlm_r1/{size}/{stage}"
            assert f"model: {expected_init}\n" in capsys.readouterr().out
            with open(os.path.join(output_dir, "metrics.jsonl")) as f:
                assert [json.loads(line)["step"] for line in f] == [1, 2]
            assert same_weights(checkpoint_weights(os.path.join(output_dir, "checkpoint-2")), weights(trainer.model))
            if kind == "grpo":
                # The frozen reference is the model the stage started from: the previous stage's checkpoint.
                assert same_weights(checkpoint_weights(expected_init), weights(trainer.ref_model))
                assert len(trainer.reward_funcs) == (3 if stage == "r1" else 2)
                if stage == "r1":  # the judge was asked for every completion and its counters were logged
                    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
                        records = [json.loads(line) for line in f]
                    assert all(r["rewards/judge/mean"] == pytest.approx(0.7) and r["judge/requests"] > 0 for r in records)
                    assert all(r["judge/fallbacks"] == 0 for r in records)
            else:
                # SFT moved the weights, so a later stage that starts from this checkpoint is told apart from one
                # that starts from this stage's own start.
                assert not same_weights(checkpoint_weights(expected_init), weights(trainer.model))
            run_config = load_yaml(os.path.join(output_dir, "run_config.yaml"))
            assert run_config[kind]["max_steps"] == 2 and run_config["data"]["part"] == ("sft" if stage == "alpha" else "rl")
            if stage == "alpha" and size == "7b":
                # Running a finished stage again is refused before anything is loaded or written.
                with pytest.raises(ValueError, match="already holds a run"):
                    sft.main(["--config", config_path, *[f"--set={o}" for o in overrides], "--set=sft.max_steps=5"])
                assert load_yaml(os.path.join(output_dir, "run_config.yaml")) == run_config

    evaluate = script("evaluate")
    eval_args = ["--config", os.path.join(CONFIGS, "eval.yaml"), "--set", f"models.base-7B={tiny}",
                 "--set", f"models.base-3B={tiny}", "--set", "max_completion_length=8", "--set", "batch_size=8",
                 "--set", "max_prompt_length=4096", "--set", "dtype=float32", "--set", "omnimedvqa.per_dataset=2", *[f"--set={o}" for o in DATA]]
    summary = evaluate.main(eval_args)
    models = list(load_yaml(os.path.join(CONFIGS, "eval.yaml"))["models"])
    assert set(summary) == set(models) and all(summary[m]["PathMMU"]["items"] == 6 for m in models)
    for name in ("base-3B", "base-7B", "gamma-7B", "R1-7B"):  # the paper's Table 3 rows
        assert {d: summary[name][d]["items"] for d in summary[name]} == {
            "PathMMU": 6, "Chest CT Scan": 2, "ISIC2020": 2, "Retinal OCT-C8": 2, "Diabetic Retinopathy": 2}
    # The out-of-domain sample is one fixed sample: the same items for every model.
    eval_dir = workdir / "runs" / "pathvlm_r1" / "eval" / "records"
    sampled = [[json.loads(line)["id"] for line in (eval_dir / m / "ISIC2020.jsonl").read_text().splitlines()]
               for m in ("base-3B", "R1-7B")]
    assert sampled[0] == sampled[1] and len(set(sampled[0])) == 2
    assert set(summary["beta-7B"]) == {"PathMMU"}

    # Scores are exact match of the <answer> against the standard answer, recomputed here from the records.
    records_path = workdir / "runs" / "pathvlm_r1" / "eval" / "records" / "R1-7B" / "PathMMU.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    solutions = {row_id: None for row_id in manifest["parts"]["test"]}
    data = json.loads((workdir / "data" / "PathMMU" / "data.json").read_text())
    for subset, splits in data.items():
        for split, items in splits.items():
            for item in items:
                if f"{subset}/{split}/{item['No']}" in solutions:
                    solutions[f"{subset}/{split}/{item['No']}"] = item["answer"]
    scores = accuracy_reward(None, [r["completion"] for r in records], [solutions[r["id"]] for r in records])
    assert summary["R1-7B"]["PathMMU"]["accuracy"] == pytest.approx(100 * sum(scores) / len(scores))
    assert summary["R1-7B"]["PathMMU"]["mean_output_tokens"] == pytest.approx(sum(r["tokens"] for r in records) / 6)

    tables = (workdir / "runs" / "pathvlm_r1" / "eval" / "tables.md").read_text()
    for heading in ("Table 1: in-domain accuracy", "Table 2: average number of output tokens", "Table 3: out-of-domain"):
        assert heading in tables
    assert "| Model | Chest CT Scan | ISIC2020 | Retinal OCT-C8 | Diabetic Retinopathy |" in tables
    r1_row = next(line for line in tables.splitlines() if line.startswith("| R1-7B |"))
    assert f"| R1-7B | {summary['R1-7B']['PathMMU']['accuracy']:.2f} | 65.55 |" in r1_row
    assert "| R1-7B | " + f"{summary['R1-7B']['PathMMU']['mean_output_tokens']:.2f} | 94.99 |" in tables
    assert f"{summary['R1-7B']['ISIC2020']['accuracy']:.2f} (80.00)" in tables
    assert json.loads((workdir / "runs" / "pathvlm_r1" / "eval" / "summary.json").read_text()) == summary

    # Interrupted evaluation: two items lost and the last line cut mid-write. The rerun decodes only those two.
    lines = records_path.read_text().splitlines()
    records_path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    decoded_batches.clear()
    again = evaluate.main(eval_args + ["--only", "R1-7B"])
    assert decoded_batches == [2]
    assert again == summary
    assert sorted(records_path.read_text().splitlines()) == sorted(lines)
    # Everything finished: the model (7B on a real run) is not even loaded.
    monkeypatch.setattr(evaluate, "load_policy", lambda *args, **kwargs: pytest.fail("a finished model was loaded"))
    assert evaluate.main(eval_args + ["--only", "R1-7B"]) == summary


def test_judge_section_without_a_judge_reward_is_a_clear_error(monkeypatch):
    import rewards

    monkeypatch.delattr(rewards, "JudgeReward", raising=False)
    grpo = script("grpo")
    config = {"rewards": ["format", "accuracy"], "reward_weights": None, "judge": {"model": "gpt-4o"}}
    with pytest.raises(RuntimeError, match=r"r1.yaml: the judge: section needs rewards.JudgeReward.*--set judge=null"):
        grpo.build_rewards(config, "r1.yaml")
    with pytest.raises(ValueError, match="unknown key 'acuracy'; did you mean 'accuracy'"):
        grpo.build_rewards({**config, "rewards": ["format", "acuracy"], "judge": None}, "beta.yaml")


def test_stage_config_unknown_keys_are_errors_with_close_matches(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    beta = os.path.join(CONFIGS, "beta_7b.yaml")
    with pytest.raises(ValueError, match="unknown key 'reward'; did you mean 'rewards'"):
        script("grpo").main(["--config", beta, "--set", "reward=[format]"])
    with pytest.raises(ValueError, match=r"\[grpo\] \(GRPOConfig\): unknown key 'group_sise'; did you mean 'group_size'"):
        script("grpo").main(["--config", beta, "--set", "grpo.group_sise=8"])
    with pytest.raises(ValueError, match=r"\[data\]: unknown key 'max_pixel'; did you mean 'max_pixels'"):
        script("sft").main(["--config", os.path.join(CONFIGS, "alpha_7b.yaml"), "--set", "data.max_pixel=10"])


def test_summary_and_tables_count_exact_matches_and_show_partial_runs(tmp_path):
    evaluate = script("evaluate")
    rows = [{"id": f"q{k}", "solution": "B) Lymphoma"} for k in range(4)]
    datasets = {"PathMMU": rows, "ISIC2020": rows[:2]}
    answers = ["<think>x</think><answer>B) Lymphoma</answer>", "<think>x</think><answer>B</answer>",
               "<answer>b) lymphoma</answer>", "<think>x</think><answer>C) Lymphoma</answer>"]
    out = tmp_path / "records"
    for model, dataset, count in (("m1", "PathMMU", 4), ("m1", "ISIC2020", 1), ("m2", "PathMMU", 2)):
        (out / model).mkdir(parents=True, exist_ok=True)
        completions = answers[:count]
        acc = accuracy_reward(None, completions, [r["solution"] for r in rows[:count]])
        fmt = format_reward(None, completions)
        with open(out / model / f"{dataset}.jsonl", "w") as f:
            for k, text in enumerate(completions):
                f.write(json.dumps({"id": f"q{k}", "completion": text, "tokens": 10 * (k + 1),
                                    "accuracy_reward": acc[k], "format_reward": fmt[k]}) + "\n")
    config = {"models": {"m1": "a", "m2": "b", "m3": "c"}, "ood_models": ["m1"], "output_dir": str(tmp_path),
              "paper": {"accuracy": {"m1": 65.55}, "ood": {"m1": [80.0]}}}
    summary = evaluate.summarise(config, datasets)
    # Exact match, letter and text: only "B) Lymphoma" and "b) lymphoma" (case-folded) count: 2 of 4.
    assert summary["m1"]["PathMMU"] == {"accuracy": 50.0, "format": 75.0, "mean_output_tokens": 25.0, "items": 4,
                                        "complete": True}
    assert summary["m2"]["PathMMU"]["items"] == 2 and not summary["m2"]["PathMMU"]["complete"]
    assert "m3" not in summary
    text = evaluate.tables(summary, datasets, config)
    assert "| m1 | 50.00 | 65.55 | 75.00 |" in text
    assert "| m2 | 50.00 (2/4 items) | - | 100.00 (2/4 items) |" in text
    assert "| m3 | - | - | - |" in text
    assert "| m1 | 100.00 (1/2 items) (80.00) |" in text


@pytest.mark.parametrize("lineage, family", [("qwen3vl_8b", "qwen3_vl"), ("medgemma_4b", "gemma3")])
def test_the_qwen3_vl_and_medgemma_lineages_run_alpha_beta_r1(workdir, monkeypatch, judge_url, lineage, family):
    """The shipped Qwen3-VL-8B and MedGemma-4B configs, on a tiny model of that family: they chain as the
    7B lineage does and differ from it only in the model, the image budget and the output paths."""
    from grpo.tiny import build_tiny_model_and_processor

    monkeypatch.chdir(workdir)
    if not (workdir / "splits" / "pathmmu_paper_seed0.json").exists():
        script("split").main(["--sizes", "12", "6", "6", "--on-bad-item", "skip"])
    tiny = workdir / f"tiny_{family}"
    model, processor = build_tiny_model_and_processor(seed=0, family=family, min_pixels=3136, max_pixels=3136)
    model.save_pretrained(str(tiny))
    processor.save_pretrained(str(tiny))
    previous = None
    for stage, kind in STAGES[:3]:
        config_path = os.path.join(CONFIGS, f"{stage}_{lineage}.yaml")
        config, paper = load_yaml(config_path), load_yaml(os.path.join(CONFIGS, f"{stage}_7b.yaml"))
        assert config[kind]["output_dir"] == f"runs/pathvlm_r1/{lineage}/{stage}"
        for values in (config, paper):
            values.pop("model"), values[kind].pop("output_dir"), values["data"].pop("max_pixels")
        assert config == paper
        overrides = SMALL[kind] + DATA + ([f"model={tiny}"] if stage == "alpha" else [])
        if stage == "r1":
            overrides += [f"judge.base_url={judge_url}", "judge.api_key=not-a-secret"]
        trainer = (script("sft") if kind == "sft" else script("grpo")).main(
            ["--config", config_path, *[f"--set={o}" for o in overrides]])
        assert trainer.family.name == family
        output_dir = f"runs/pathvlm_r1/{lineage}/{stage}"
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2]
        if previous:  # each stage starts from the one before it
            assert same_weights(checkpoint_weights(os.path.join(previous, "checkpoint-2")), weights(trainer.ref_model))
        previous = output_dir


def test_the_lora_lineage_chains_adapters_with_the_previous_stage_as_reference(workdir, monkeypatch, judge_url):
    """alpha/beta/r1 *_7b_lora.yaml: SFT trains an adapter, each GRPO stage continues the previous
    stage's adapter with that stage (base + its adapter as saved) as the KL reference; every
    checkpoint is the adapter alone, in PEFT's layout."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from grpo.lora import REFERENCE

    monkeypatch.chdir(workdir)
    if not (workdir / "splits" / "pathmmu_paper_seed0.json").exists():
        script("split").main(["--sizes", "12", "6", "6", "--on-bad-item", "skip"])
    previous = None
    for stage, kind in STAGES[:3]:
        config_path = os.path.join(CONFIGS, f"{stage}_7b_lora.yaml")
        config = load_yaml(config_path)
        assert config[kind]["deepspeed"] is None and config[kind]["dtype"] == "bfloat16"  # one GPU
        overrides = SMALL[kind] + DATA + ([f"model={workdir / 'tiny'}"] if stage == "alpha" else [])
        if stage == "r1":
            overrides += [f"judge.base_url={judge_url}", "judge.api_key=not-a-secret"]
        trainer = (script("sft") if kind == "sft" else script("grpo")).main(
            ["--config", config_path, *[f"--set={o}" for o in overrides]])
        output_dir = f"runs/pathvlm_r1/7b/{stage}_lora"
        checkpoint = os.path.join(output_dir, "checkpoint-2")
        assert os.path.isfile(os.path.join(checkpoint, "adapter_model.safetensors"))
        assert not os.path.exists(os.path.join(checkpoint, "model.safetensors"))
        saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
        trained = {k.replace(".default", ""): v for k, v in trainer.model.named_parameters() if ".default." in k}
        assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k].float()) for k in saved)
        if previous:  # the reference adapter is the previous stage's, as its checkpoint holds it
            started = load_file(os.path.join(previous, "adapter_model.safetensors"))
            reference = {k.replace(f".{REFERENCE}", ""): v for k, v in trainer.model.named_parameters() if f".{REFERENCE}." in k}
            assert reference.keys() == started.keys() and all(torch.equal(reference[k].float(), started[k]) for k in started)
            assert trainer.ref_model is None
        previous = checkpoint
