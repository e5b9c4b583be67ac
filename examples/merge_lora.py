"""Merge a LoRA checkpoint into its base model: a plain `save_pretrained` model for serving or evaluation.

    python examples/merge_lora.py runs/pathvlm_r1/7b/beta_lora/checkpoint-2000 runs/pathvlm_r1/7b/beta_merged
    python examples/merge_lora.py CHECKPOINT OUTPUT --base-model Qwen/Qwen2.5-VL-7B-Instruct --dtype bfloat16

The base model is the one the adapter's adapter_config.json names (`base_model_name_or_path`) unless
--base-model gives another (a hub name or a directory). The checkpoint's processor is written too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo import merge_lora  # noqa: E402


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a LoRA checkpoint directory (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("output", help="where the merged model and processor go")
    parser.add_argument("--base-model", default=None, help="the base model (default: the one the adapter names)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    path = merge_lora(args.checkpoint, args.output, base_model=args.base_model, dtype=args.dtype)
    print(f"merged model: {path}")
    return path


if __name__ == "__main__":
    main()
