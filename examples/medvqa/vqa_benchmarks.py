"""What the medical VQA scripts share: the `benchmarks:` section of a config -> prompt rows per benchmark.

A benchmark's settings are `root` plus any keyword of its loader in `data.medvqa` (`splits`, `files`,
`language`, `image_dir`, `on_bad_item`, `max_visual_tokens`, `max_pixels`, ...); settings given at the top
level of the config (the image budget, on_bad_item) apply to every benchmark that does not set them.
"""

from __future__ import annotations

import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from data import (  # noqa: E402
    BENCHMARKS, MEDICAL_SYSTEM_PROMPT, load_medxpertqa_mm, load_pathvqa, load_pmc_vqa, load_slake, load_vqa_rad,
    to_prompt_rows,
)
from grpo.config import check_keys, unknown_key_error  # noqa: E402

LOADERS = {"vqa_rad": load_vqa_rad, "pathvqa": load_pathvqa, "slake": load_slake, "pmc_vqa": load_pmc_vqa,
           "medxpertqa_mm": load_medxpertqa_mm}
assert tuple(LOADERS) == BENCHMARKS
# Top-level settings every loader takes: on_bad_item and the image budget (data/images.py), sized to each
# model's visual tokens when it is loaded.
SHARED_KEYS = ("on_bad_item", "max_visual_tokens", "min_pixels", "max_pixels")


def loader_keys(name: str) -> list[str]:
    return list(inspect.signature(LOADERS[name]).parameters)


def load_benchmark(name: str, settings: dict, shared: dict, source: str, limit: int | None = None) -> list[dict]:
    """Prompt rows of one benchmark (the first `limit` rows when given), with the medical system prompt."""
    if name not in LOADERS:
        raise unknown_key_error(name, LOADERS, f"{source} [benchmarks]")
    settings = dict(settings or {})
    check_keys(settings, loader_keys(name), f"{source} [benchmarks.{name}]")
    if not settings.get("root"):
        raise ValueError(f"{source} [benchmarks.{name}]: no root: give the folder of the release "
                         f"(--root {name}=PATH, or root: in the config)")
    kwargs = {key: value for key, value in shared.items() if value is not None and key in SHARED_KEYS}
    kwargs.update(settings)
    for key in ("splits", "files"):  # YAML lists; a single name is a list of one
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]]
    rows = LOADERS[name](**kwargs)
    if limit is not None:
        rows = rows[:limit]
    print(f"data: {len(rows)} rows of {name} from {settings['root']}")
    return to_prompt_rows(rows, system_prompt=MEDICAL_SYSTEM_PROMPT, source=name)
