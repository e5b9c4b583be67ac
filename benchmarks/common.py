"""Shared setup of the benchmarks: the model shapes, the data, a saved model directory, peak RSS.

Every side of a comparison loads the same saved directory (random weights drawn from a fixed seed)
and the same rows, so the only difference between the sides is the code that runs them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import make_toy_dataset, to_prompt_rows  # noqa: E402
from grpo.tiny import build_processor, build_tiny_tokenizer, model_from_config, tiny_config  # noqa: E402

# name -> model and workload shape. paper-shape-small keeps the paper's proportions at CPU size:
# ~256 visual tokens per prompt (448 x 448 image), short answers (64 tokens), a model of tens of
# millions of parameters with Qwen2.5-VL's head_dim 128 and mRoPE sections [16, 24, 24].
# max_vocab_size caps the BPE tokenizer trained on the toy corpus; the corpus may stop it earlier
# (paper-shape-small's stops at 831), so the built size is read off the model: `describe`.
CONFIGS = {
    "tiny": dict(hidden_size=64, num_layers=2, vision=None, image_size=56, max_vocab_size=512,
                 prompts_per_step=2, group_size=4, max_completion_length=16),
    "paper-shape-small": dict(hidden_size=512, num_layers=8, image_size=448, max_vocab_size=4096,
                              vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, window_size=112),
                              prompts_per_step=2, group_size=4, max_completion_length=64),
}
SEED = 0


def rows_for(name: str, n: int) -> list[dict]:
    return to_prompt_rows(make_toy_dataset(n, seed=SEED, image_size=CONFIGS[name]["image_size"]), source="toy")


def build(name: str):
    """The random-weight model and processor of a benchmark config, deterministic from SEED."""
    shape = CONFIGS[name]
    rows = rows_for(name, 64)
    corpus = [row["question"] + " " + " ".join(row["options"]) + " " + row["explanation"] for row in rows]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=shape["max_vocab_size"])
    pixels = shape["image_size"] ** 2
    processor = build_processor(tokenizer, min_pixels=pixels, max_pixels=pixels)
    config = tiny_config(tokenizer, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                         vision_depth=(shape["vision"] or {}).get("depth", 2))
    for key, value in (shape["vision"] or {}).items():
        setattr(config.vision_config, key, value)
    config.vision_config.fullatt_block_indexes = [config.vision_config.depth - 1]
    return model_from_config(config, SEED), processor


def describe(model) -> dict:
    """The built model's sizes, for the JSON reports (the vocabulary is the built one, not the cap)."""
    text = model.config.text_config
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "vision_parameters": sum(p.numel() for p in model.model.visual.parameters()),
            "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "layers": text.num_hidden_layers}


def save(name: str, directory: str) -> dict:
    """Save the config's model and processor to `directory`; returns `describe` of the model."""
    model, processor = build(name)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return describe(model)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def write_report(report: dict, path: str | None, hide_suffix: str) -> None:
    """Print the report (without the per-step lists, keys ending in `hide_suffix`) and save it whole as JSON."""
    print(json.dumps({k: v for k, v in report.items() if not k.endswith(hide_suffix)}, indent=1))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
