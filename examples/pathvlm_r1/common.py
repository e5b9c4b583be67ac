"""What the PathVLM-R1 scripts share: a YAML config with --set overrides, the data, the model."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data import load_pathmmu, select_part, to_prompt_rows  # noqa: E402
from data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS  # noqa: E402
from data.pathmmu import PAPER_SUBSETS, SPLITS  # noqa: E402
from grpo.config import apply_overrides, check_keys, load_yaml  # noqa: E402
from grpo.training import list_checkpoints, load_model, load_processor  # noqa: E402

# The `data:` section: where PathMMU lives, which frozen split part to use, and the image budget.
DATA_DEFAULTS = {
    "pathmmu_root": "data/PathMMU",
    "manifest": "splits/pathmmu_paper_seed0.json",  # written by split.py
    "part": None,  # sft | rl | test
    "subsets": list(PAPER_SUBSETS),
    "splits": list(SPLITS),
    "min_pixels": DEFAULT_MIN_PIXELS,
    "max_pixels": DEFAULT_MAX_PIXELS,
    "on_bad_item": "error",  # error | skip
}


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
                        min_pixels=data["min_pixels"], max_pixels=data["max_pixels"])
    part = select_part(rows, data["manifest"], data["part"])
    print(f"data: {len(part)} rows of part {data['part']!r} from {data['manifest']}")
    return to_prompt_rows(part, source=f"{data['manifest']} part {data['part']}")


def resolve_model(path: str) -> str:
    """A hub name, a model or LoRA-adapter directory as is; a training run's output directory -> its latest checkpoint."""
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} holds no checkpoint: run the stage that writes it first (see the README)")
    return found[-1]


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


def save_run_config(config: dict, output_dir: str) -> None:
    """The resolved config next to the run's checkpoints: what was run, overrides included."""
    import yaml

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "run_config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
