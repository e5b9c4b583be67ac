"""Evaluate models the way the paper does and write its Tables 1-3.

    python examples/pathvlm_r1/evaluate.py --config examples/pathvlm_r1/configs/eval.yaml [--only R1-7B ...]

Greedy decoding (do_sample=False), batched; an answer counts when its last <answer> block is the
standard answer, letter and option text (rewards.accuracy_reward, "option" mode). Writes under
`output_dir`:
  records/<model>/<dataset>.jsonl  one line per item: id, completion, tokens, scores
  summary.json                     accuracy, format rate, mean output tokens, items done, per model and dataset
  tables.md                        Table 1 (in-domain accuracy), Table 2 (average output tokens),
                                   Table 3 (out-of-domain accuracy), each beside the paper's numbers
An interrupted run resumes where it stopped: finished items are read back, not decoded again.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    IMAGE_BUDGET_KEYS, evaluate_model, load_config, load_part, load_policy, parse_args, summarise_records,
    write_results,
)

from data import load_omnimedvqa, to_prompt_rows  # noqa: E402
from grpo.config import check_keys, unknown_key_error  # noqa: E402
from rewards import accuracy_reward, format_reward  # noqa: E402

IN_DOMAIN = "PathMMU"
SECTIONS = {
    "models": None,  # name -> hub name, model directory or training run directory
    "ood_models": None,  # the models Table 3 evaluates out of domain (null: all)
    "data": None,  # the PathMMU test part
    "omnimedvqa": None,  # {root, datasets}; null: no out-of-domain evaluation
    "output_dir": "runs/pathvlm_r1/eval",
    "batch_size": 16,
    "max_prompt_length": 1024,
    "max_completion_length": 1024,
    "dtype": "bfloat16",
    "paper": None,  # the paper's numbers, shown beside ours: {accuracy: {model: %}, tokens: {...}, ood: {model: [%...]}}
}
OMNI_KEYS = {"root": "data/OmniMedVQA", "datasets": None, "per_dataset": None, "seed": 0}
SCORERS = [accuracy_reward, format_reward]


def load_datasets(config: dict, source: str) -> dict[str, list[dict]]:
    data = {**config["data"], "part": config["data"]["part"] or "test"}
    datasets = {IN_DOMAIN: load_part(data, source)}
    if config["omnimedvqa"]:
        check_keys(config["omnimedvqa"], OMNI_KEYS, f"{source} [omnimedvqa]")
        omni = {**OMNI_KEYS, **config["omnimedvqa"]}
        names = omni["datasets"] or []
        rows = load_omnimedvqa(omni["root"], names, on_bad_item=data["on_bad_item"],
                               **{key: data[key] for key in IMAGE_BUDGET_KEYS})
        for name in names:
            chosen = [row for row in rows if row["source"] == name]
            if omni["per_dataset"] and len(chosen) > omni["per_dataset"]:
                # A fixed random sample (same seed, same items for every model), in file order.
                keep = set(random.Random(omni["seed"]).sample(range(len(chosen)), omni["per_dataset"]))
                chosen = [row for k, row in enumerate(chosen) if k in keep]
            datasets[name] = to_prompt_rows(chosen, source=f"OmniMedVQA {name}")
            print(f"data: {len(datasets[name])} rows of OmniMedVQA {name}")
    return datasets


def summarise(config: dict, datasets: dict) -> dict:
    """Per model and dataset, from the records on disk (so runs split with --only add up)."""

    def score(done: list[dict], rows: list[dict]) -> dict:
        return {"accuracy": 100 * sum(r[accuracy_reward.__name__] for r in done) / len(done),
                "format": 100 * sum(r[format_reward.__name__] for r in done) / len(done),
                "mean_output_tokens": sum(r["tokens"] for r in done) / len(done), "items": len(done)}

    return summarise_records(config, datasets, score)


def _cell(result: dict | None, key: str, total: int) -> str:
    if result is None:
        return "-"
    text = f"{result[key]:.2f}"
    return text if result["complete"] else f"{text} ({result['items']}/{total} items)"


def _paper(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def tables(summary: dict, datasets: dict, config: dict) -> str:
    paper = config["paper"] or {}
    n = {name: len(rows) for name, rows in datasets.items()}
    lines = [f"# PathVLM-R1 reproduction ({n[IN_DOMAIN]} PathMMU test items)", "",
             "Table 1: in-domain accuracy (%) on the PathMMU test part", "",
             "| Model | Acc. (ours) | Acc. (paper) | Format (ours) |", "|---|---|---|---|"]
    for name in config["models"]:
        result = summary.get(name, {}).get(IN_DOMAIN)
        lines.append(f"| {name} | {_cell(result, 'accuracy', n[IN_DOMAIN])} | {_paper((paper.get('accuracy') or {}).get(name))} "
                     f"| {_cell(result, 'format', n[IN_DOMAIN])} |")
    lines += ["", "Table 2: average number of output tokens on the PathMMU test part (end-of-turn token included)", "",
              "| Model | Tokens (ours) | Tokens (paper) |", "|---|---|---|"]
    for name in config["models"]:
        result = summary.get(name, {}).get(IN_DOMAIN)
        lines.append(f"| {name} | {_cell(result, 'mean_output_tokens', n[IN_DOMAIN])} "
                     f"| {_paper((paper.get('tokens') or {}).get(name))} |")
    ood = [name for name in datasets if name != IN_DOMAIN]
    if ood:
        lines += ["", "Table 3: out-of-domain accuracy (%) on OmniMedVQA, ours (paper)", "",
                  "| Model | " + " | ".join(ood) + " |", "|---|" + "---|" * len(ood)]
        for name in config["ood_models"] or config["models"]:
            cells = []
            for k, dataset in enumerate(ood):
                theirs = (paper.get("ood") or {}).get(name)
                cells.append(f"{_cell(summary.get(name, {}).get(dataset), 'accuracy', n[dataset])} "
                             f"({_paper(theirs[k] if theirs and k < len(theirs) else None)})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(__doc__, argv, **{"--only": dict(action="append", default=[], metavar="MODEL",
                                                       help="evaluate only this model (repeatable); tables cover all")})
    config = load_config(args.config, args.set, SECTIONS)
    if not config["models"]:
        raise ValueError(f"{args.config}: 'models' must map model names to paths")
    for name in args.only + list(config["ood_models"] or []):
        if name not in config["models"]:
            raise unknown_key_error(name, config["models"], f"{args.config} [models]")
    datasets = load_datasets(config, args.config)
    ood_models = set(config["ood_models"] or config["models"])
    for name, path in config["models"].items():
        if args.only and name not in args.only:
            continue
        chosen = {k: v for k, v in datasets.items() if k == IN_DOMAIN or name in ood_models}
        evaluate_model(name, path, chosen, config, SCORERS, load_policy)
    summary = summarise(config, datasets)
    write_results(config["output_dir"], summary, tables(summary, datasets, config), "tables.md")
    return summary


if __name__ == "__main__":
    main()
