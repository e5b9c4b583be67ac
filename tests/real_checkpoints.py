"""Model directories laid out as a user's real checkpoint is, small enough for CPU tests.

The processor files of real checkpoints (tokenizer, chat template, image-processor settings,
generation config; no weights) lie in a `real_processors/` folder, one sub-folder per checkpoint
(each noting where its files came from). `build_real_checkpoint` takes one of them, builds a random-weight model of the
checkpoint's own config, shrunk in width and depth only, and saves it beside copies of those files:
the directory then loads by path (`AutoProcessor.from_pretrained`, `grpo.loading.load_model`,
`grpo.Trainer(path, ...)`) as the real checkpoint would.

What the shrinking keeps: every token id, the vocabulary size, the patch / merge / temporal-patch
sizes, the soft tokens per image, the layer-type pattern (Gemma 3's five sliding-window layers and
one global one, Qwen3.5's three linear-attention layers and one full-attention one), the rotary
split (mRoPE sections rescaled to the smaller head, summing to its rotary half). What it changes:
widths, depths, head counts, Gemma 3's sliding window (16 tokens, so that prompts exceed it).

The folder is found at `$PATHGRPO_REAL_PROCESSORS`, else at `<repo>/../shared/real_processors`
(where CI puts it beside the clone); a clone without it skips the tests that need it.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

ENV_VARIABLE = "PATHGRPO_REAL_PROCESSORS"
FOLDERS = ("qwen2_5_vl", "gemma3", "qwen3_5")
TEXT_HIDDEN, VISION_HIDDEN = 64, 32
GEMMA3_SLIDING_WINDOW = 16  # tokens: shorter than every test prompt, so the window masks something
# A wider initialisation than the checkpoints' 0.02: at 0.02 the logits of a 64-wide model are nearly
# uniform over 150k-260k tokens and 1-D positions in place of Qwen2.5-VL's mRoPE move a log-prob by
# only ~1e-3, ten times the tests' tolerance; at 0.1 by 0.07-0.8 nats.
INIT_RANGE = 0.1
_NOT_COPIED = ("config.json", "PROVENANCE.md")  # the shrunk config replaces the first; the second is no checkpoint file


def real_processors_root() -> Path:
    """Where the real processor folders are: `$PATHGRPO_REAL_PROCESSORS`, else `<repo>/../shared/real_processors`."""
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE])
    return Path(__file__).resolve().parents[2] / "shared" / "real_processors"


def missing_reason(folder: str) -> str | None:
    """Why the real processor files of `folder` cannot be used (a pytest skip reason), or None."""
    path = real_processors_root() / folder
    if not (path / "config.json").is_file():
        return (f"no real processor files at {path} (a fresh clone has none: put the shared/real_processors folder "
                f"beside the repository, or set {ENV_VARIABLE})")
    return None


def _rescaled_sections(sections: list[int], half: int) -> list[int]:
    """mRoPE sections (temporal, height, width) rescaled to sum to `half`, the rotary dim / 2 of the
    shrunk head, in the real split's proportions (the rounding remainder goes to the first)."""
    total = sum(sections)
    scaled = [max(1, round(s * half / total)) for s in sections]
    scaled[0] += half - sum(scaled)
    return scaled


def _shrink_rope(text, head_dim: int) -> None:
    rope = dict(text.rope_parameters)
    if "mrope_section" in rope:
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        rope["mrope_section"] = _rescaled_sections(list(rope["mrope_section"]), rotary // 2)
    text.rope_parameters = rope


def shrink_config(config):
    """A copy of a real checkpoint's config, narrow and shallow (see the module docstring)."""
    config = copy.deepcopy(config)
    text, vision = config.get_text_config(), config.vision_config
    text.hidden_size, text.intermediate_size = TEXT_HIDDEN, 2 * TEXT_HIDDEN
    text.initializer_range = config.initializer_range = vision.initializer_range = INIT_RANGE
    kind = config.model_type
    if kind == "qwen2_5_vl":
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = 2, 4, 2  # head_dim 16
        text.layer_types = text.layer_types[:2]
        _shrink_rope(text, TEXT_HIDDEN // text.num_attention_heads)
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, VISION_HIDDEN, 64, 2
        vision.fullatt_block_indexes = [1]  # block 0 windowed, block 1 full (the real tower: every 8th full)
        vision.out_hidden_size = TEXT_HIDDEN
    elif kind == "gemma3":
        period = text.layer_types.index("full_attention") + 1  # 5 sliding layers, then a global one
        text.num_hidden_layers, text.layer_types = period, text.layer_types[:period]
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 32
        text.query_pre_attn_scalar = text.head_dim  # the real one is its head_dim (256)
        text.sliding_window = GEMMA3_SLIDING_WINDOW
        vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size = 2, VISION_HIDDEN, 64
        vision.num_attention_heads = 2
    elif kind == "qwen3_5":
        period = text.layer_types.index("full_attention") + 1  # 3 linear-attention layers, then a full one
        text.num_hidden_layers, text.layer_types = period, text.layer_types[:period]
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 64
        text.linear_num_key_heads = text.linear_num_value_heads = 2
        text.linear_key_head_dim = text.linear_value_head_dim = 16
        _shrink_rope(text, text.head_dim)  # rotary on a quarter of the head: 16 dims, sections sum to 8
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, VISION_HIDDEN, 64, 2
        vision.out_hidden_size = TEXT_HIDDEN
    else:
        raise ValueError(f"no shrinking rule for model_type {kind!r} (known: {', '.join(FOLDERS)})")
    return config


def build_real_checkpoint(folder: str, out_dir, seed: int = 0) -> Path:
    """Write a model directory for real-processor folder `folder` into `out_dir` (created) and return
    it: the shrunk model's weights and config (float32, random weights from `seed`), and a copy of
    every processor file of the folder. Where the folder has no generation_config.json (Qwen3.5-0.8B
    published none), the directory has none either, as the user's."""
    from transformers import AutoConfig

    from grpo.tiny import model_from_config  # Gemma 3's image projection random too, not transformers' zeros

    source = real_processors_root() / folder
    out_dir = Path(out_dir)
    config = shrink_config(AutoConfig.from_pretrained(source))
    config.dtype = torch.float32
    model = model_from_config(config, seed)
    model.save_pretrained(out_dir)
    if not (source / "generation_config.json").exists():
        (out_dir / "generation_config.json").unlink(missing_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED:
            shutil.copyfile(path, out_dir / path.name)  # copyfile: not the source's read-only mode
    return out_dir
