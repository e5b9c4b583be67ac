"""Shared setup of the benchmarks: the model shapes, the data, a saved model directory, peak RSS.

Every side of a comparison loads the same saved directory (random weights drawn from a fixed seed)
and the same rows, so the only difference between the sides is the code that runs them.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import make_toy_dataset, to_prompt_rows  # noqa: E402
from grpo.models import family_for  # noqa: E402
from grpo.prompts import encode_prompts  # noqa: E402
from grpo.models.qwen2_vl import qwen2_5_vl_config, qwen2_5_vl_processor  # noqa: E402
from grpo.tiny import FAMILIES, build_tiny_model_and_processor, build_tiny_tokenizer, model_from_config  # noqa: E402

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
    # paper-shape-small's workload on a ~4.5x larger language model: where the weights, not the
    # activations, start to dominate a step's memory (the LoRA comparison's second row).
    "paper-shape-wide": dict(hidden_size=1024, num_layers=12, image_size=448, max_vocab_size=4096,
                             vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, window_size=112),
                             prompts_per_step=2, group_size=4, max_completion_length=64),
}
SEED = 0
DEFAULT_FAMILY = "qwen2_5_vl"  # the configs above are Qwen2.5-VL; `--family` builds the others like them

# paper-shape-small for the other families: the language model is the family's tiny builder's
# (grpo/tiny.py) at hidden 512 and 8 layers (head_dim 128, intermediate 1024, as above), the vision
# tower is resized to a 4-layer, 256-wide one (~3-6 M parameters), and the image gives ~256 visual
# tokens: Qwen2-VL 448 px / 28-px tokens = 16 x 16; the Qwen3 families 16-px patches merged 2x2, so
# 512 px / 32 = 16 x 16; Gemma 3 SigLIP on 448 px (32 x 32 patches of 14) average-pooled to
# mm_tokens_per_image 256; InternVL one 448-px tile (32 x 32 patches) pixel-shuffled by 0.5 to 256.
_VISION_256 = dict(hidden_size=256, intermediate_size=1024)
FAMILY_SHAPES = {
    "qwen2_vl": dict(image_size=448, vision=dict(depth=4, embed_dim=256, mlp_ratio=4, num_heads=4)),
    "qwen3_vl": dict(image_size=512, vision=dict(depth=4, num_heads=4, num_position_embeddings=1024,
                                                 deepstack_visual_indexes=[1, 2], **_VISION_256)),
    # 3 Gated DeltaNet layers to 1 full-attention layer, as in the released Qwen3.5 models.
    "qwen3_5": dict(image_size=512, vision=dict(depth=4, num_heads=4, num_position_embeddings=1024, **_VISION_256),
                    text=dict(layer_types=["linear_attention"] * 3 + ["full_attention"], head_dim=128,
                              linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                              linear_value_head_dim=64)),
    # 5 sliding-window layers to 1 global, as in Gemma 3; a 256-token window (the prompt is ~460 tokens).
    "gemma3": dict(image_size=448, mm_tokens_per_image=256,
                   vision=dict(num_hidden_layers=4, num_attention_heads=4, image_size=448, **_VISION_256),
                   text=dict(layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=256)),
    "internvl": dict(image_size=448, image_seq_length=256,
                     vision=dict(num_hidden_layers=4, num_attention_heads=4, image_size=[448, 448], **_VISION_256)),
}


def image_size(name: str, family: str = DEFAULT_FAMILY) -> int:
    if name == "paper-shape-small" and family != DEFAULT_FAMILY:
        return FAMILY_SHAPES[family]["image_size"]
    return CONFIGS[name]["image_size"]


def rows_for(name: str, n: int, family: str = DEFAULT_FAMILY) -> list[dict]:
    return to_prompt_rows(make_toy_dataset(n, seed=SEED, image_size=image_size(name, family)), source="toy")


def build(name: str, family: str = DEFAULT_FAMILY):
    """The random-weight model and processor of a benchmark config, deterministic from SEED."""
    if family != DEFAULT_FAMILY:
        return build_family(name, family)
    shape = CONFIGS[name]
    rows = rows_for(name, 64)
    corpus = [row["question"] + " " + " ".join(row["options"]) + " " + row["explanation"] for row in rows]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=shape["max_vocab_size"])
    pixels = shape["image_size"] ** 2
    processor = qwen2_5_vl_processor(tokenizer, min_pixels=pixels, max_pixels=pixels)
    config = qwen2_5_vl_config(tokenizer, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                         vision_depth=(shape["vision"] or {}).get("depth", 2))
    for key, value in (shape["vision"] or {}).items():
        setattr(config.vision_config, key, value)
    config.vision_config.fullatt_block_indexes = [config.vision_config.depth - 1]
    return model_from_config(config, SEED), processor


def build_family(name: str, family: str):
    """`build` for a family other than Qwen2.5-VL: its tiny builder at the config's sizes, then (for
    paper-shape-small) the FAMILY_SHAPES changes, the model rebuilt from the changed config."""
    shape = CONFIGS[name]
    rows = rows_for(name, 64, family)
    corpus = [row["question"] + " " + " ".join(row["options"]) + " " + row["explanation"] for row in rows]
    pixels = image_size(name, family) ** 2
    model, processor = build_tiny_model_and_processor(
        corpus, seed=SEED, vocab_size=shape["max_vocab_size"], hidden_size=shape["hidden_size"],
        num_layers=shape["num_layers"], min_pixels=pixels, max_pixels=pixels, family=family)
    if name != "paper-shape-small":
        return model, processor
    changes = FAMILY_SHAPES[family]
    config = model.config
    for key, value in changes["vision"].items():
        setattr(config.vision_config, key, value)
    text = config.get_text_config()
    for key, value in changes.get("text", {}).items():
        if key == "layer_types":  # a repeating pattern, cut to the number of layers
            value = [value[i % len(value)] for i in range(text.num_hidden_layers)]
        setattr(text, key, value)
    if family == "qwen3_5":  # mRoPE sections sum to the rotary half of head_dim (a quarter of it rotates)
        rotary_half = int(text.head_dim * text.rope_parameters["partial_rotary_factor"]) // 2
        spatial = int(rotary_half * 5 / 16)
        text.rope_parameters = {**text.rope_parameters, "mrope_section": [rotary_half - 2 * spatial, spatial, spatial]}
    if family == "gemma3":
        from transformers import Gemma3ImageProcessor, Gemma3Processor

        size = changes["image_size"]
        config.mm_tokens_per_image = changes["mm_tokens_per_image"]
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}),
                                    tokenizer=processor.tokenizer, chat_template=processor.chat_template,
                                    image_seq_length=changes["mm_tokens_per_image"])
    if family == "internvl":  # one 448-px tile per image, no thumbnail
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        size = changes["image_size"]
        config.image_seq_length = changes["image_seq_length"]
        processor = InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=False),
            tokenizer=processor.tokenizer, video_processor=InternVLVideoProcessor(),
            image_seq_length=changes["image_seq_length"], chat_template=processor.chat_template)
    return model_from_config(config, SEED), processor


def describe(model, processor=None, name: str | None = None, family: str = DEFAULT_FAMILY) -> dict:
    """The built model's sizes, for the JSON reports (the vocabulary is the built one, not the cap);
    with `processor` and `name`, also one benchmark prompt's token counts."""
    text = model.config.get_text_config()
    fam = family_for(model, processor, quiet=True)
    vision = fam.vision_modules(model)
    info = {"parameters": sum(p.numel() for p in model.parameters()),
            "vision_parameters": sum(p.numel() for module in vision for p in module.parameters()),
            "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "layers": text.num_hidden_layers}
    if processor is not None and name is not None:
        prompts = encode_prompts(fam, rows_for(name, 1, family), [0], 1 << 20)
        info["prompt_tokens"] = prompts.input_ids.shape[1]
        # the family's image-token row where it has one, else the image token (InternVL)
        info["visual_tokens"] = int(prompts.token_types.sum()) if prompts.token_types.any() else (
            int((prompts.input_ids == model.config.image_token_id).sum()))
    return info


def save(name: str, directory: str, family: str = DEFAULT_FAMILY) -> dict:
    """Save the config's model and processor to `directory`; returns `describe` of the model."""
    model, processor = build(name, family)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return {"family": family, **describe(model, processor, name, family)}


def peak_rss_mib() -> float:
    """The most resident memory this process has held (VmHWM, Linux), MiB. Not ru_maxrss: a child
    started by fork or vfork + exec inherits its parent's peak there (the benchmark parent, which
    built the model, held ~870 MiB on the tiny config), so every side would report at least that."""
    return _status("VmHWM")


def rss_mib() -> float:
    """The resident memory this process holds now (VmRSS), MiB."""
    return _status("VmRSS")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024  # kB


# A worker environment in which glibc's malloc gives freed memory back: every allocation of 128 KiB or
# more (every tensor that counts) gets its own mmap, unmapped when freed, so resident memory follows
# the live tensors. By default glibc raises that threshold to the size of each large block freed (up
# to 32 MiB) and keeps freed blocks below it for reuse, so resident memory stays near its highest and
# grows with fragmentation. Read once, when the process starts.
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


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
