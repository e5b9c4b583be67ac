"""Our rollout vs Hugging Face `generate(num_return_sequences=G)` on the same prompts.

    python benchmarks/bench_rollout.py --config paper-shape-small --json benchmarks/results/rollout_paper-shape-small.json

Ours: image features once per image, each prompt prefilled once, its KV cache repeated G times,
then the sampling loop. HF: the prompt batch expanded G times (vision tower and prefill run G times
per prompt), then its sampling loop. Same model, prompts, G, max_new_tokens, temperature 1, and EOS
plus the vision tokens suppressed on both sides, so both produce exactly B * G * max_new_tokens
tokens. The two alternate `--repeats` times in one process after one warm-up call each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from grpo.decoding import StaticDecoder  # noqa: E402
from grpo.logprobs import with_image_features  # noqa: E402
from grpo.models import family_for  # noqa: E402
from grpo.prompts import encode_prompts  # noqa: E402
from grpo.sampling import SamplingParams, generate  # noqa: E402
from grpo.tiny import FAMILIES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(common.CONFIGS), default="tiny")
    parser.add_argument("--family", choices=FAMILIES, default=common.DEFAULT_FAMILY,
                        help="the config's shape built as this family's model (benchmarks/common.py)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile-decode", choices=["on", "off"], default="off",
                        help="on: also time our rollout with static-shape, compiled decoding (grpo/decoding.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = common.CONFIGS[args.config]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    model, processor = common.build(args.config, args.family)
    model.eval()
    family = family_for(model, processor)
    G, C, B = shape["group_size"], shape["max_completion_length"], shape["prompts_per_step"]
    rows = common.rows_for(args.config, B, args.family)
    prompts = encode_prompts(family, rows, list(range(B)), max_prompt_length=4096)
    eos, pad = family.eos_ids, family.pad_id
    family.forbidden_ids = suppressed = family.forbidden_ids + eos  # every completion runs to the limit: same work

    def ours(decoder=None):
        with torch.no_grad():
            cached = with_image_features(family, model, prompts)
            out = generate(family, model, cached, SamplingParams(max_new_tokens=C), group_size=G,
                           generator=torch.Generator().manual_seed(0), decoder=decoder)
        return out.ids

    def hf():
        out = model.generate(
            input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
            **family.forward_kwargs(prompts.token_types), **prompts.pixel_inputs(), do_sample=True, temperature=1.0,
            top_p=1.0, top_k=0, num_return_sequences=G, max_new_tokens=C, suppress_tokens=suppressed,
            eos_token_id=eos, pad_token_id=pad,
        )
        return out[:, prompts.input_ids.shape[1]:]

    sides = {"ours": ours, "hf_generate": hf}
    if args.compile_decode == "on":
        decoder = StaticDecoder()
        sides["ours_compiled"] = lambda: ours(decoder)
    times = {name: [] for name in sides}
    warmup = {}
    for name, func in sides.items():  # warm-up (compilation included), and every side must produce every token
        start = time.perf_counter()
        assert func().shape == (B * G, C), name
        warmup[name] = time.perf_counter() - start
    for repeat in range(args.repeats):
        for name in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in sides), flush=True)
    tokens = B * G * C
    report = {"benchmark": "rollout", "config": args.config, "family": args.family, "shape": shape,
              "model": common.describe(model, processor, args.config, args.family),
              "tokens_per_rollout": tokens,
              "prompt_tokens": int(prompts.attention_mask.sum(1).max()), "started": started, "machine": common.machine(),
              "threads": args.threads, "repeats": args.repeats, "compile_decode": args.compile_decode,
              "warmup_s": warmup}
    for name in sides:
        median = statistics.median(times[name])
        report.update({f"{name}_s_median": median, f"{name}_tokens_per_s": tokens / median, f"{name}_s": times[name]})
    report["speedup"] = report["hf_generate_s_median"] / report["ours_s_median"]
    if "ours_compiled" in sides:  # eager / compiled, compile time excluded (it is the compiled side's warmup_s)
        report["compiled_speedup"] = report["ours_s_median"] / report["ours_compiled_s_median"]
    common.write_report(report, args.json, hide_suffix="_s")


if __name__ == "__main__":
    main()
