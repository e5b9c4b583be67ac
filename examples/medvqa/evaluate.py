"""Evaluate models on the medical VQA benchmarks and write one table of results.

    python examples/medvqa/evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --benchmarks vqa_rad,pathvqa,slake,pmc_vqa,medxpertqa_mm --config examples/medvqa/configs/eval.yaml
    python examples/medvqa/evaluate.py --model mine=runs/medvqa/grpo_3b --benchmarks slake \
        --root slake=data/Slake1.0 --limit 50

Greedy decoding (grpo.evaluate), batched. Each answer is read from its last <answer> block and scored
by `rewards.vqa_metrics`: closed accuracy (every closed item counts), open exact match, token
precision / recall / F1, choice accuracy; plus the format rate and mean output tokens. Writes under
the output directory:
  records/<model>/<benchmark>.jsonl  one line per item: id, completion, tokens, answer_reward, format_reward
  summary.json                       the metrics per model and benchmark, from the records on disk
  results.md                         the same as a Markdown table
An interrupted run resumes where it stopped: finished items are read back, not decoded again, and a
model whose benchmarks are all done is not even loaded. Benchmark roots and loader settings come from
the config's `benchmarks:` section, `--root NAME=PATH` on top.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vqa_benchmarks import ROOT, SHARED_KEYS, load_benchmark  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "examples", "pathvlm_r1"))
from common import evaluate_model, load_policy, summarise_records, write_results  # noqa: E402

from grpo.config import apply_overrides, check_keys, load_yaml  # noqa: E402
from rewards import answer_reward, format_reward, vqa_metrics  # noqa: E402

SECTIONS = {
    "models": None,  # name -> hub name, model directory or training run directory (its latest checkpoint)
    "benchmarks": None,  # name -> {root, loader settings}; see vqa_benchmarks.py
    "output_dir": "runs/medvqa/eval",
    "batch_size": 16,
    "max_prompt_length": 4096,
    "max_completion_length": 1024,
    "dtype": "bfloat16",
    "limit": None,  # the first N rows of each benchmark (quick runs)
    "on_bad_item": "error",  # for every benchmark that does not set its own
    # The image budget (data/images.py), sized to each model's visual tokens when it is loaded:
    "max_visual_tokens": None,  # None: 512, unless max_pixels is given
    "min_pixels": None,  # or the budget in pixels
    "max_pixels": None,
}
SCORERS = [answer_reward, format_reward]
METRICS = [("closed_accuracy", "Closed acc."), ("open_exact_match", "Open EM"), ("open_recall", "Open recall"),
           ("open_f1", "Open F1"), ("choice_accuracy", "Choice acc."), ("format", "Format")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="a model to evaluate (repeatable): hub name, directory or training run; NAME defaults to its last path part")
    parser.add_argument("--benchmarks", help="comma-separated, from: vqa_rad, pathvqa, slake, pmc_vqa, medxpertqa_mm "
                                             "(default: every benchmark of the config)")
    parser.add_argument("--config", help="YAML file (configs/eval.yaml)")
    parser.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="a benchmark's folder (repeatable)")
    parser.add_argument("--limit", type=int, help="evaluate the first N items of each benchmark")
    parser.add_argument("--output-dir", help="where records, summary.json and results.md go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (YAML)")
    return parser.parse_args(argv)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if flag == "--model" and not sep:
            name, path = os.path.basename(os.path.normpath(value)), value
        elif not sep or not name or not path:
            raise ValueError(f"{flag} {value!r}: expected NAME=PATH")
        pairs[name] = path
    return pairs


def load_config(args) -> dict:
    source = args.config or "command line"
    values = apply_overrides(load_yaml(args.config) if args.config else {}, args.set)
    check_keys(values, SECTIONS, source)
    config = {**SECTIONS, **values, "source": source}
    config["models"] = {**(config["models"] or {}), **_pairs(args.model, "--model")}
    benchmarks = {name: dict(settings or {}) for name, settings in (config["benchmarks"] or {}).items()}
    for name, root in _pairs(args.root, "--root").items():
        benchmarks.setdefault(name, {})["root"] = root
    if args.benchmarks:
        benchmarks = {name: benchmarks.get(name, {}) for name in args.benchmarks.split(",") if name.strip()}
    config["benchmarks"] = benchmarks
    if args.limit is not None:
        config["limit"] = args.limit
    if args.output_dir:
        config["output_dir"] = args.output_dir
    if not config["models"]:
        raise ValueError(f"{source}: no model: give --model PATH or a models: section")
    if not benchmarks:
        raise ValueError(f"{source}: no benchmark: give --benchmarks and their roots, or a benchmarks: section")
    return config


def summarise(config: dict, datasets: dict) -> dict:
    """Per model and benchmark, from the records on disk (so split or interrupted runs add up):
    `rewards.vqa_metrics` of the finished items, their format rate and mean output tokens."""

    def score(done: list[dict], rows: list[dict]) -> dict:
        return {**vqa_metrics([record["completion"] for record in done], rows)["all"],
                "format": sum(record[format_reward.__name__] for record in done) / len(done),
                "mean_output_tokens": sum(record["tokens"] for record in done) / len(done)}

    return summarise_records(config, datasets, score)


def table(summary: dict, datasets: dict) -> str:
    """One row per model and benchmark; metrics in %, "-" where the benchmark has no item of that type."""
    lines = ["| Model | Benchmark | Items | " + " | ".join(title for _, title in METRICS) + " | Mean output tokens |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for name, results in summary.items():
        for benchmark, result in results.items():
            items = f"{result['items']}" if result["complete"] else f"{result['items']}/{len(datasets[benchmark])}"
            cells = ["-" if result[key] is None else f"{100 * result[key]:.2f}" for key, _ in METRICS]
            lines.append(f"| {name} | {benchmark} | {items} | " + " | ".join(cells) + f" | {result['mean_output_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    config = load_config(args)
    shared = {key: config[key] for key in SHARED_KEYS}
    datasets = {name: load_benchmark(name, settings, shared, config["source"], config["limit"])
                for name, settings in config["benchmarks"].items()}
    for name, path in config["models"].items():
        evaluate_model(name, path, datasets, config, SCORERS, load_policy)
    summary = summarise(config, datasets)
    write_results(config["output_dir"], summary, table(summary, datasets), "results.md")
    return summary


if __name__ == "__main__":
    main()
