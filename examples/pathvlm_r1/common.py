"""What the PathVLM-R1 scripts share: a YAML config with --set overrides, the data, the model."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data import load_pathmmu, select_part, size_images_for, to_prompt_rows  # noqa: E402
from data.pathmmu import PAPER_SUBSETS, SPLITS  # noqa: E402
from grpo.config import apply_overrides, check_keys, load_yaml, save_yaml, unknown_key_error  # noqa: E402
from grpo.models import family_class, unwrap  # noqa: E402
from grpo.checkpoints import check_output_dir, resolve_model  # noqa: E402
from grpo.loading import load_model, load_processor  # noqa: E402

# The `data:` section: where PathMMU lives, which frozen split part to use, and the image budget.
DATA_DEFAULTS = {
    "pathmmu_root": "data/PathMMU",
    "manifest": "splits/pathmmu_paper_seed0.json",  # written by split.py
    "part": None,  # sft | rl | test
    "subsets": list(PAPER_SUBSETS),
    "splits": list(SPLITS),
    # The image budget (data/images.py), sized to the model's visual tokens when it is loaded:
    "max_visual_tokens": None,  # None: 512 (the paper's), unless max_pixels is given
    "min_pixels": None,  # or the budget in pixels
    "max_pixels": None,
    "on_bad_item": "error",  # error | skip
}
IMAGE_BUDGET_KEYS = ("max_visual_tokens", "min_pixels", "max_pixels")


def parse_args(description: str, argv=None, **extra):
    """--config FILE and repeated --set key=value (dotted keys reach into sections: grpo.beta=0)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value; the value is read as YAML (1e-6, true, null, [a, b])")
    for flag, options in extra.items():
        parser.add_argument(flag, **options)
    # The `deepspeed` launcher appends --local_rank=N; the trainers read LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_config(path: str, overrides: list[str], sections: dict) -> dict:
    """The config file with overrides applied; top-level keys checked against `sections` (their defaults)."""
    values = apply_overrides(load_yaml(path), overrides)
    check_keys(values, sections, path)
    config = {**sections, **values}
    if "data" in sections:
        data = config.get("data") or {}
        check_keys(data, DATA_DEFAULTS, f"{path} [data]")
        config["data"] = {**DATA_DEFAULTS, **data}
    return config


def load_part(data: dict, source: str) -> list[dict]:
    """The rows of one split part as prompt rows (chat messages added, fields validated)."""
    if not os.path.isfile(data["manifest"]):
        raise FileNotFoundError(f"{source}: split manifest {data['manifest']} not found; write it first with "
                                f"examples/pathvlm_r1/split.py (see the README)")
    rows = load_pathmmu(data["pathmmu_root"], data["subsets"], data["splits"], on_bad_item=data["on_bad_item"],
                        **{key: data[key] for key in IMAGE_BUDGET_KEYS})
    part = select_part(rows, data["manifest"], data["part"])
    print(f"data: {len(part)} rows of part {data['part']!r} from {data['manifest']}")
    return to_prompt_rows(part, source=f"{data['manifest']} part {data['part']}")


def load_policy(path: str, dtype: str, device=None):
    """Model and processor from a hub name, a model directory or a run.

    The model stays on the CPU unless `device` is given: the trainers (or DeepSpeed) put it on each
    process's own GPU, whereas a move here would put every process's copy on GPU 0. A script that
    runs the model itself (evaluation) passes `grpo.distributed.default_device()`.
    """
    import torch

    resolved = resolve_model(path)
    print(f"model: {resolved}")
    model = load_model(resolved, dtype)
    if device is not None:
        model = model.to(device)
    if torch.cuda.is_available():
        # fp32 weights keep the small AdamW updates; TF32 matmuls make their compute several times faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return model, load_processor(None, resolved)


def sized_for(rows: list[dict], model, processor) -> list[dict]:
    """`rows` (loaded before the model) with their images sized to `model`'s visual tokens (its family's
    pixels per visual token; not resized where its processor sizes images itself): data.images."""
    return size_images_for(rows, family_class(unwrap(model).config).image_token_pixels(processor))


def save_run_config(config: dict, output_dir: str) -> None:
    """The resolved config next to the run's checkpoints: what was run, overrides included."""
    save_yaml(config, os.path.join(output_dir, "run_config.yaml"))


def pick_rewards(config: dict, available: dict, source: str) -> tuple[list, list[float]]:
    """The reward functions a config's `rewards:` names (from `available`) and its `reward_weights` (default 1 each)."""
    funcs = []
    for name in config["rewards"]:
        if name not in available:
            raise unknown_key_error(name, available, f"{source} [rewards]")
        funcs.append(available[name])
    weights = [float(w) for w in config["reward_weights"]] if config["reward_weights"] is not None else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{source}: {len(weights)} reward_weights for {len(funcs)} rewards {config['rewards']}")
    return funcs, weights


def train_grpo(config: dict, grpo_config, rows: list[dict], reward_funcs: list, weights: list[float]):
    """Load `config["model"]`, record the resolved config next to the run, and run GRPO on `rows`."""
    from grpo import Trainer

    # Before loading the model or writing run_config.yaml: an earlier run there is never half-replaced.
    check_output_dir(grpo_config.output_dir, grpo_config.resume_from_checkpoint, grpo_config.overwrite_output_dir)
    model, processor = load_policy(config["model"], grpo_config.dtype)
    save_run_config(config, grpo_config.output_dir)
    rows = sized_for(rows, model, processor)
    trainer = Trainer(model, processor, reward_funcs, rows, grpo_config, reward_weights=weights)
    trainer.train()
    return trainer


def records_path(config: dict, model: str, dataset: str) -> str:
    """Where the evaluation of `model` on `dataset` keeps its records (one JSON line per item)."""
    return os.path.join(config["output_dir"], "records", model, f"{dataset}.jsonl")


def read_records(path: str) -> dict:
    """Records already written to `path`, by id (a line cut by an interruption is ignored)."""
    import json

    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in filter(str.strip, f):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                records[record["id"]] = record
    return records


def evaluate_model(name: str, path: str, datasets: dict, config: dict, scorers: list, load=load_policy) -> None:
    """Greedy-decode every dataset's unfinished items with one model (loaded with `load` only when some
    are left) and append their records, resumably; prints each dataset's accuracy and output length."""
    import torch

    from grpo import evaluate
    from grpo.distributed import default_device

    todo = {dataset: rows for dataset, rows in datasets.items()
            if not {row["id"] for row in rows} <= set(read_records(records_path(config, name, dataset)))}
    if not todo:
        print(f"[{name}] every dataset already evaluated ({', '.join(datasets)}); not loading the model")
        return
    model, processor = load(path, config["dtype"], device=default_device())
    for dataset, rows in todo.items():
        rows = sized_for(rows, model, processor)
        result = evaluate(model, processor, rows, scorers, batch_size=config["batch_size"],
                          max_completion_length=config["max_completion_length"],
                          max_prompt_length=config["max_prompt_length"], output_path=records_path(config, name, dataset),
                          resume=True, progress=f"{name} / {dataset}")
        accuracy = f"accuracy {100 * result['accuracy']:.2f}%, " if "accuracy" in result else ""
        print(f"[{name}] {dataset}: {accuracy}mean output tokens {result['mean_completion_tokens']:.1f} "
              f"({len(rows)} items)")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next model needs the memory


def summarise_records(config: dict, datasets: dict, score) -> dict:
    """{model: {dataset: score(records, rows) + complete}} over the items whose records are on disk
    (so runs split by model or interrupted add up); `score` gets the done items' records and rows."""
    summary = {}
    for name in config["models"]:
        for dataset, rows in datasets.items():
            records = read_records(records_path(config, name, dataset))
            done = [row for row in rows if row["id"] in records]
            if done:
                result = score([records[row["id"]] for row in done], done)
                summary.setdefault(name, {})[dataset] = {**result, "complete": len(done) == len(rows)}
    return summary


def write_results(output_dir: str, summary: dict, tables: str, tables_name: str) -> None:
    """summary.json and the Markdown tables under `output_dir`; the tables are printed too."""
    import json

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(output_dir, tables_name), "w") as f:
        f.write(tables)
    print(tables)
