"""The medical VQA evaluation suite and training example end to end on a tiny model, over fixture copies
of all five benchmarks laid out as the shipped configs expect: the table's numbers recomputed from the
records, an interrupted evaluation resumed without decoding finished items, --limit, and a GRPO step on
the closed + open + choice mix."""

import importlib.util
import json
import os

import pytest
from dataset_trees import write_medvqa

from rewards import vqa_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "examples", "medvqa")
ALL = "vqa_rad,pathvqa,slake,pmc_vqa,medxpertqa_mm"
SMALL = ["--set", "max_completion_length=8", "--set", "batch_size=8", "--set", "dtype=float32", "--set", "max_pixels=3136"]


def script(name):
    spec = importlib.util.spec_from_file_location(f"medvqa_{name}", os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_parts):
    root = tmp_path_factory.mktemp("medvqa_suite")
    write_medvqa(str(root / "data"))
    model, processor = tiny_parts
    model.save_pretrained(str(root / "tiny"))
    processor.save_pretrained(str(root / "tiny"))
    return root


def test_the_suite_evaluates_five_benchmarks_writes_the_table_and_resumes(workdir, monkeypatch, decoded_batches):
    monkeypatch.chdir(workdir)
    evaluate = script("evaluate")
    args = ["--model", f"tiny={workdir / 'tiny'}", "--benchmarks", ALL, "--config", os.path.join(SCRIPTS, "configs", "eval.yaml"),
            *SMALL]
    summary = evaluate.main(args)
    tiny = summary["tiny"]
    assert list(tiny) == ALL.split(",")
    assert {b: (r["items"], r["closed_items"], r["open_items"], r["choice_items"]) for b, r in tiny.items()} == {
        "vqa_rad": (4, 2, 2, 0), "pathvqa": (5, 3, 2, 0), "slake": (4, 2, 2, 0), "pmc_vqa": (4, 0, 0, 4),
        "medxpertqa_mm": (3, 0, 0, 3)}
    assert all(r["complete"] for r in tiny.values())

    # Every number is vqa_metrics of the records on disk against the benchmark's rows.
    out = workdir / "runs" / "medvqa" / "eval"
    rows = evaluate.load_benchmark("pathvqa", {"root": "data/path-vqa"}, {"max_pixels": 3136}, "test")
    records = [json.loads(line) for line in (out / "records" / "tiny" / "pathvqa.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    expected = vqa_metrics([by_id[row["id"]]["completion"] for row in rows], rows)["all"]
    assert {k: tiny["pathvqa"][k] for k in expected} == expected
    assert tiny["pathvqa"]["mean_output_tokens"] == pytest.approx(sum(r["tokens"] for r in records) / 5)
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "results.md").read_text()
    assert table.startswith("| Model | Benchmark | Items | Closed acc. | Open EM | Open recall | Open F1 | Choice acc. | Format |")
    pmc = next(line for line in table.splitlines() if line.startswith("| tiny | pmc_vqa |"))
    assert pmc.split(" | ")[3:6] == ["-", "-", "-"]  # no closed or open item: no number
    print(table)

    # Interrupted: two PathVQA records lost and the last line cut mid-write. The rerun decodes only those.
    path = out / "records" / "tiny" / "pathvqa.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    decoded_batches.clear()
    assert evaluate.main(args) == summary
    assert decoded_batches == [3]
    assert sorted(path.read_text().splitlines()) == sorted(lines)
    # Everything finished: the model is not even loaded.
    monkeypatch.setattr(evaluate, "load_policy", lambda *a, **kw: pytest.fail("a finished model was loaded"))
    assert evaluate.main(args) == summary


def test_limit_and_roots_from_flags(workdir, tmp_path):
    evaluate = script("evaluate")
    summary = evaluate.main(["--model", str(workdir / "tiny"), "--benchmarks", "slake", "--root", f"slake={workdir / 'data' / 'Slake1.0'}",
                             "--limit", "2", "--output-dir", str(tmp_path), *SMALL])
    assert summary["tiny"]["slake"]["items"] == 2 and summary["tiny"]["slake"]["complete"]
    with pytest.raises(ValueError, match="no root"):
        evaluate.main(["--model", "x", "--benchmarks", "pathvqa", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown key 'splitz'.*did you mean 'splits'"):
        evaluate.main(["--model", "x", "--benchmarks", "slake", "--root", "slake=y", "--set", "benchmarks.slake.splitz=[test]"])


def test_grpo_trains_on_the_closed_open_choice_mix(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    grpo = script("grpo")
    overrides = [f"model={workdir / 'tiny'}", "benchmarks.pathvqa.splits=[test]", "benchmarks.pmc_vqa.files=[test_2.csv]",
                 "max_pixels=3136", "grpo.max_steps=1", "grpo.prompts_per_step=4", "grpo.completions_per_micro_batch=8",
                 "grpo.max_completion_length=8", "grpo.max_prompt_length=4096", "grpo.deepspeed=null", "grpo.dtype=float32"]
    trainer = grpo.main(["--config", os.path.join(SCRIPTS, "configs", "grpo_mix_3b.yaml"), *[f"--set={o}" for o in overrides]])
    kinds = [row["answer_type"] for row in trainer.train_dataset]
    assert len(kinds) == 2 + 5 + 1 + 4 and set(kinds) == {"closed", "open", "choice"}
    with open(os.path.join("runs", "medvqa", "grpo_mix_3b", "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["step"] == 1 and "rewards/answer_reward_partial/mean" in record and "rewards/format_reward/mean" in record
