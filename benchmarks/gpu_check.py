"""GRPO at real model sizes on one GPU: s/step, tokens/s, peak memory, shared vs plain log-probs.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json           # one 80+ GB GPU, < 8 min
    python benchmarks/gpu_check.py --device cpu --tiny --json /tmp/gpu_check_tiny.json  # CI size, CPU, seconds
    python benchmarks/gpu_check.py --decode-only --json /tmp/decode.json              # decoding alone

For each shape (Qwen2.5-VL-7B, Qwen3-VL-8B, Gemma-3-4B) the model is built from its published config
values, written out below (no download), with random weights in bf16 directly on the GPU. The text goes
through the in-repo tiny tokenizer of the family (grpo/tiny.py): with random weights the token ids only
need to be in the real vocabulary's range (ids past the tiny tokenizer decode to nothing). The image
processors keep the real settings, sized so a prompt carries ~400 visual tokens: Qwen2.5-VL 14-px
patches merged 2x2, a 560 x 560 image -> 20 x 20 = 400 tokens; Qwen3-VL 16-px patches merged 2x2,
640 x 640 -> 400 tokens; Gemma 3 a fixed 256 soft tokens per 896 x 896 image. Text fills each prompt to
512 tokens. Each shape runs 3 GRPO steps of our Trainer (G = 4, 2 prompts per step, 256-token
completions with EOS suppressed so every completion is full length, vision tower frozen), then one
more rollout whose completions are scored with `grpo.logprobs.group_logprobs` on the shared-prefix and
the plain path: the JSON records the largest |shared - plain| difference over completion tokens.

Decoding, the larger part of a step, is also timed alone first (`"decode"`, `--decode-only` for it
alone): `grpo.sampling.generate` as the rollout calls it, at the run's batch (N = 2 x 4 completions,
EOS suppressed), once to warm up, then timed, split where the first decoding forward starts: before
it the prefill (`prefill_ms`: the prompts' forward and the first token), after it C - 1 token steps
(`ms_per_token_step`: a forward feeding N tokens, and the sampling). Against it, the HBM-bandwidth
bound: the bytes one step must read (the language model's weights and the KV cache,
`decode_bytes_per_step`) over the copy bandwidth of the device measured in the same process.
`"decode": {"eager": {...}, "compiled": {...}}`: the eager decode loop, and the same rollout through
`grpo.decoding.StaticDecoder` (static shapes, one compiled forward, CUDA graphs on a GPU; its first
rollout, the compilation, timed as `warmup_s`), or `{"fallback": why}` where the model decodes eagerly.

Memory: full fine-tuning of a 7-8B model in bf16 holds the weights (2 bytes/parameter), their gradients
and AdamW's two states (6 bytes per trainable parameter), and with beta > 0 a reference copy (2 more);
about 75 GB for Qwen2.5-VL-7B before activations. Where that and an activation allowance do not fit
the GPU, the shape runs with beta = 0 (no reference model) and the JSON says so (`beta`).

`--device cpu --tiny` runs the same code on the tiny builders of grpo/tiny.py in float32 (small
prompts and completions): what tests/test_gpu_check.py runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUP_SIZE, PROMPTS_PER_STEP, STEPS = 4, 2, 3
ACTIVATION_ALLOWANCE = 16e9  # bytes kept free for activations and logits at 512 + 4 x 256 tokens per micro-batch
BYTES_PER_TRAINABLE = 6  # bf16 gradient + AdamW exp_avg + exp_avg_sq (torch keeps them in the parameter dtype)
# The copy measuring the device's bandwidth: well past every cache (an H200's L2 is 60 MB); CPU: smaller.
COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}
COPY_REPEATS = 5  # the bandwidth: the median of this many copies
# Timed rollouts after the warm-up one, the fastest kept: a GPU's are steady and take seconds; a CPU's at
# CI size take milliseconds, and other work on a shared machine only adds time.
ROLLOUT_REPEATS = {"cuda": 1, "cpu": 5}

# Published config values (the checkpoints' config.json), written out here so nothing is downloaded.
SHAPES = {
    # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2_5_vl_7b": dict(
        family="qwen2_5_vl", image_size=560, prompt_tokens=512, completion_tokens=256,
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  tie_word_embeddings=False),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2),
    ),
    # Qwen/Qwen3-VL-8B-Instruct
    "qwen3_vl_8b": dict(
        family="qwen3_vl", image_size=640, prompt_tokens=512, completion_tokens=256,
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True},
                  tie_word_embeddings=False),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
    ),
    # google/gemma-3-4b-it: 5 sliding-window (1024) layers to 1 global, linear RoPE scaling x8 on the
    # global layers; SigLIP-So400m at 896 px (64 x 64 patches) average-pooled to 256 tokens.
    "gemma3_4b": dict(
        family="gemma3", image_size=896, prompt_tokens=512, completion_tokens=256,
        text=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                    num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=256,
    ),
}
# --tiny: the same families from grpo/tiny.py (56 x 56 images: 4 visual tokens), CI-size prompts and answers.
TINY = dict(image_size=56, prompt_tokens=96, completion_tokens=8)


def real_config(shape: dict, tiny_config):
    """The shape's full-size config, with the special-token ids of the tiny tokenizer (`tiny_config`'s)."""
    from transformers import Gemma3Config, Qwen2_5_VLConfig, Qwen3VLConfig

    tiny_text = tiny_config.get_text_config()
    special = dict(bos_token_id=tiny_text.bos_token_id, eos_token_id=tiny_text.eos_token_id,
                   pad_token_id=tiny_text.pad_token_id)
    text = {**shape["text"], **special}
    if shape["family"] == "gemma3":
        return Gemma3Config(text_config=text, vision_config=shape["vision"],
                            mm_tokens_per_image=shape["mm_tokens_per_image"], boi_token_index=tiny_config.boi_token_index,
                            eoi_token_index=tiny_config.eoi_token_index, image_token_index=tiny_config.image_token_index)
    config_class = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[shape["family"]]
    ids = {key: getattr(tiny_config, key) for key in
           ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return config_class(text_config=text, vision_config=shape["vision"], tie_word_embeddings=text["tie_word_embeddings"],
                        **ids)


def real_processor(shape: dict, tiny_processor):
    """The tiny processor's tokenizer with the real image settings (see the module docstring). The Qwen
    processors already have them: `build` makes them with the shape's pixel budget."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer, size = tiny_processor.tokenizer, shape["image_size"]
    if shape["family"] == "gemma3":
        return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}),
                               tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                               image_seq_length=shape["mm_tokens_per_image"])
    return tiny_processor  # built with min_pixels = max_pixels = image_size ** 2 (`build`)


def build(name: str, shape: dict, args):
    """(model on the device, processor) for a shape; --tiny: the tiny builder's model itself."""
    import torch
    from transformers import AutoModelForImageTextToText

    from grpo.tiny import build_tiny_model_and_processor

    if args.tiny:  # the builder's own image budget
        tiny_model, tiny_processor = build_tiny_model_and_processor(family=shape["family"], seed=args.seed)
        return tiny_model.to(args.device), tiny_processor
    pixels = shape["image_size"] ** 2
    tiny_model, tiny_processor = build_tiny_model_and_processor(family=shape["family"], min_pixels=pixels,
                                                                max_pixels=pixels, seed=args.seed)
    config = real_config(shape, tiny_model.config)
    if args.layers:  # a shallow model of the same widths: a quick check of the log-prob paths
        config.get_text_config().num_hidden_layers = args.layers
        if hasattr(config.get_text_config(), "layer_types"):
            config.get_text_config().layer_types = config.get_text_config().layer_types[: args.layers]
        vision = config.vision_config
        for key in ("depth", "num_hidden_layers"):
            if hasattr(vision, key):
                setattr(vision, key, args.layers)
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if hasattr(vision, key):
                setattr(vision, key, [i for i in getattr(vision, key) if i < args.layers] or [args.layers - 1])
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # random init on the GPU: no 16 GB fp32 model in host memory first
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, args.dtype))
    text = config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    return model, real_processor(shape, tiny_processor)


def make_rows(family, shape: dict, seed: int) -> list[dict]:
    """PROMPTS_PER_STEP rows (a toy image + a question) whose prompts are `prompt_tokens` long (or the
    nearest below: text is added a word at a time; the byte-level BPE counts words independently)."""
    from data import make_toy_dataset

    from grpo.prompts import encode_prompts

    toy = make_toy_dataset(PROMPTS_PER_STEP, seed=seed, image_size=shape["image_size"])
    tokenizer = family.processor.tokenizer
    rows = []
    for index, example in enumerate(toy):
        words = (" ".join([example["question"], *example["options"], example["explanation"]]) + " ").split()
        row = {"image": example["image"], "solution": example["solution"]}

        def prompt(text):
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

        row["prompt"] = prompt("")
        room = shape["prompt_tokens"] - encode_prompts(family, [row], [index], 1 << 20).input_ids.shape[1]
        text, count = [], 0
        while True:
            word = words[len(text) % len(words)]
            cost = len(tokenizer(" " + word if text else word, add_special_tokens=False).input_ids)
            if count + cost > room:
                break
            text.append(word)
            count += cost
        row["prompt"] = prompt(" ".join(text))
        rows.append(row)
    return rows


def length_reward(prompts, completions, **columns):
    """A cheap reward with a spread within a group (the update then has non-zero advantages)."""
    return [float(len(c)) for c in completions]


def run_shape(name: str, shape: dict, args) -> dict:
    import torch

    from grpo.models import family_for
    from grpo.prompts import encode_prompts

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, processor = build(name, shape, args)
    family = family_for(model, processor, quiet=True)
    suppress_eos(family)
    vision = {id(p) for module in family.vision_modules(model) for p in module.parameters()}
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if id(p) not in vision)
    rows = make_rows(family, shape, args.seed)
    max_prompt_length = 4 * shape["prompt_tokens"]  # room to spare: no prompt is cut
    prompts = encode_prompts(family, rows, list(range(len(rows))), max_prompt_length).to(args.device)
    build_s = time.perf_counter() - t0
    if prompts.token_types.any():
        visual = int(prompts.token_types.sum(1).max())
    else:  # families without a token-type row: count the image token
        image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
        visual = int((prompts.input_ids == image_id).sum(1).max())
    result = {
        "family": shape["family"], "parameters": parameters, "trainable_parameters": trainable,
        "vocab_size": model.config.get_text_config().vocab_size, "dtype": str(next(model.parameters()).dtype),
        "prompt_tokens": int(prompts.attention_mask.sum(1).max()), "visual_tokens_per_prompt": visual,
        "completion_tokens": shape["completion_tokens"], "group_size": GROUP_SIZE, "prompts_per_step": PROMPTS_PER_STEP,
        "build_s": build_s,
    }
    # Decoding first, while the GPU holds the model alone (the same state with and without --decode-only).
    result["decode"] = {"eager": measure_decode(family, model, prompts, shape["completion_tokens"], vision, args)}
    if args.compile_decode == "on":
        from grpo.decoding import StaticDecoder

        reason = StaticDecoder().why_not(family, model)  # such a family decodes eagerly: nothing else to time
        result["decode"]["compiled"] = {"fallback": reason} if reason else measure_decode(
            family, model, prompts, shape["completion_tokens"], vision, args, compiled=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak recorded below is the GRPO steps'
    if not args.decode_only:
        result.update(grpo_steps(model, processor, rows, shape, args, parameters, trainable, max_prompt_length))
    del model
    if cuda:
        torch.cuda.empty_cache()
    return result


def suppress_eos(family) -> None:
    """Every completion full length: the family never samples its end-of-sequence ids."""
    family.forbidden_ids = sorted(set(family.forbidden_ids) | set(family.eos_ids))


def grpo_steps(model, processor, rows: list[dict], shape: dict, args, parameters: int, trainable: int,
               max_prompt_length: int) -> dict:
    """STEPS GRPO steps of the Trainer (their times, tokens/s, peak memory), then one more rollout
    scored on the shared-prefix path, the plain path and the model's own forward."""
    import torch

    from grpo import GRPOConfig, Trainer
    from grpo.logprobs import group_logprobs, with_image_features
    from grpo.prompts import encode_prompts

    cuda = args.device.startswith("cuda")
    beta = args.beta
    if cuda and beta > 0:
        need = 2 * parameters * 2 + BYTES_PER_TRAINABLE * trainable + ACTIVATION_ALLOWANCE
        if need > torch.cuda.get_device_properties(args.device).total_memory:
            beta = 0.0  # no room for a reference copy (see the module docstring)
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, group_size=GROUP_SIZE, prompts_per_step=PROMPTS_PER_STEP,
            completions_per_micro_batch=GROUP_SIZE, max_prompt_length=max_prompt_length,
            max_completion_length=shape["completion_tokens"], beta=beta, loss_type="grpo", num_iterations=1,
            temperature=1.0, learning_rate=1e-6, max_steps=STEPS, save_steps=0, log_completions=0,
            freeze_vision_tower=True, shared_prefix=True, seed=args.seed,
            # AdamW on the bf16 weights themselves: fp32 master weights (the default, 12 more bytes per
            # trained parameter) do not fit beside a 7-8B model on one GPU; this check times steps.
            master_weights=False,
            # The steps decode as the decode section's second record does (compiled unless --compile-decode off);
            # their first step carries the compilation.
            compile_decode=args.compile_decode == "on",
        )
        trainer = Trainer(model, processor, [length_reward], rows, cfg)
        trainer.save = lambda step: None  # the end-of-run checkpoint (tens of GB at 7B) is not what is measured
        fam = trainer.family
        suppress_eos(fam)
        history = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(args.device) if cuda else None

        # One more rollout, scored on both paths (no gradient; plain prompts carry pixels, not cached features).
        generator = torch.Generator(device=trainer.device).manual_seed(args.seed + 1)
        batch = trainer.rollout(rows, list(range(len(rows))), generator)
        trainer.opt.train(False)
        prompt_index = [i // GROUP_SIZE for i in range(batch.completion_ids.shape[0])]
        with torch.no_grad():
            plain_prompts = encode_prompts(fam, rows, list(range(len(rows))), cfg.max_prompt_length).to(trainer.device)
            shared = group_logprobs(fam, trainer.model, with_image_features(fam, trainer.model, plain_prompts),
                                    prompt_index, batch.completion_ids, batch.completion_mask, shared_prefix=True)
            plain = group_logprobs(fam, trainer.model, plain_prompts, prompt_index, batch.completion_ids,
                                   batch.completion_mask, shared_prefix=False)
            own = own_forward_logprobs(fam, trainer.model, rows, batch, args.own_forward)
        mask = batch.completion_mask.bool()
        difference = (shared - plain).abs()[mask]
        checked = mask[: len(own)]
        own_shared = (shared[: len(own)] - own).abs()[checked]
        own_plain = (plain[: len(own)] - own).abs()[checked]
    step_s = [h["step_time"] for h in history]
    timed = step_s[1:]  # the first step carries CUDA / allocator warm-up (and the decoding step's compilation)
    return {
        "beta": beta, "reference_model": beta > 0, "steps_compile_decode": args.compile_decode == "on",
        "step_s": step_s, "s_per_step": sum(timed) / len(timed),
        "tokens_per_s": sum(h["tokens_per_sec"] for h in history[1:]) / len(timed),
        "peak_gpu_memory_gib": peak / 2**30 if peak is not None else None,
        "max_abs_logprob_diff_shared_vs_plain": float(difference.max()),
        "mean_abs_logprob_diff_shared_vs_plain": float(difference.mean()),
        # Against the model's own forward over each unpadded prompt + completion (the first few completions).
        "own_forward_completions": len(own),
        "max_abs_logprob_diff_shared_vs_own": float(own_shared.max()) if len(own) else None,
        "max_abs_logprob_diff_plain_vs_own": float(own_plain.max()) if len(own) else None,
        "mean_abs_logprob_diff_plain_vs_own": float(own_plain.mean()) if len(own) else None,
    }


def clock(device: str) -> float:
    """time.perf_counter() once the device's queue is drained (CUDA runs asynchronously)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def copy_bandwidth(device: str) -> float:
    """GB/s of a device-to-device `copy_` (bytes read + written, median of COPY_REPEATS): the memory
    bandwidth a step that only streams weights and cache could reach, measured rather than the datasheet's."""
    import torch

    source = torch.ones(COPY_BYTES["cuda" if device.startswith("cuda") else "cpu"], dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up; on CPU it also maps the target's pages
    times = []
    for _ in range(COPY_REPEATS):
        start = clock(device)
        target.copy_(source)
        times.append(clock(device) - start)
    return 2 * source.numel() / statistics.median(times) / 1e9


def decode_bytes_per_step(model, vision: set[int], fed: list[tuple[int, int]]) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decoding forward reads at the least, `fed` holding each decoding
    forward's (rows, cached slots attended) as the rollout ran them.

    Weights: every parameter outside the vision modules (`vision`: their ids), once per step; not the
    input embedding when it is not tied to the output head (a step gathers N of its rows, not the table).
    KV cache: per layer, the keys and values of every slot every row attends, in the model's dtype
    (a sliding-window layer: at most its window, though the compiled step's full-length static layer
    reads every slot under the mask; a linear-attention layer: none, its fixed-size state is not
    counted), averaged over the decoding forwards. A packed family
    feeds B rows of P + (s + 1) G slots at step s (a prompt's G completions side by side in its row),
    the others N rows of P + s + 1 (the prompt's cache repeated G times); P counts the padding.
    """
    from grpo.models import text_config

    weights = [p for p in model.parameters() if id(p) not in vision]
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not head:
        weights = [p for p in weights if p is not embedding]
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)

    config = text_config(model.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    slot_bytes = 2 * config.num_key_value_heads * head_dim * next(model.parameters()).element_size()  # keys + values
    def attended(kind: str, length: int) -> int:
        if kind == "sliding_attention" and window:
            return min(length, window)
        return 0 if kind == "linear_attention" else length

    slots = sum(rows * sum(attended(kind, length) for kind in layer_types) for rows, length in fed)
    return weight_bytes, slot_bytes * slots // len(fed)


def _timed_decoder_class():
    from grpo.decoding import StaticDecoder

    class TimedDecoder(StaticDecoder):
        """A StaticDecoder that reports each decoding step's inputs before running it (the timing hook
        cannot sit on the model's forward: torch.compile would trace it into the graph)."""

        before_step = None

        def step(self, model, **inputs):
            if self.before_step is not None:
                self.before_step(inputs)
            return super().step(model, **inputs)

    return TimedDecoder


def measure_decode(family, model, prompts, completion_tokens: int, vision: set[int], args, compiled: bool = False) -> dict:
    """The rollout's decoding alone: ms per token step against the HBM-bandwidth bound. `compiled`:
    through `grpo.decoding.StaticDecoder` (static shapes, one compiled forward; CUDA graphs on a GPU),
    its first rollout (the compilation) timed as `compile_s`."""
    import torch

    from grpo.logprobs import with_image_features
    from grpo.sampling import SamplingParams, generate

    model.train(False)
    with torch.no_grad():  # as the rollout: the vision tower runs before decoding, not in it
        prompts = with_image_features(family, model, prompts)
    generator = torch.Generator(device=prompts.input_ids.device)

    def rollout() -> tuple[float, float, list[tuple[int, int]]]:
        """(prefill s, decoding s, each decoding forward's (rows, slots attended)) of one rollout, split
        where its first decoding forward starts: before it the prompts' forward, the cache's room and
        the first token; after it C - 1 forwards and their tokens."""
        forwards, split = [] if decoder is None else [None], []  # a decoder sees the decoding forwards only

        def mark(module, inputs, kwargs):
            forwards.append((kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[-1]))
            if len(forwards) == 2:
                split.append(clock(args.device))

        # Eager: a hook on the model's forward. Compiled: the decoder's step, outside the compiled graph.
        hook = model.register_forward_pre_hook(mark, with_kwargs=True) if decoder is None else None
        if decoder is not None:
            decoder.before_step = lambda inputs: mark(None, (), inputs)
        try:
            generator.manual_seed(args.seed)
            start = clock(args.device)
            out = generate(family, model, prompts, SamplingParams(max_new_tokens=completion_tokens, temperature=1.0),
                           group_size=GROUP_SIZE, generator=generator, shared_prefix=True, decoder=decoder)
            end = clock(args.device)
        finally:
            if hook is not None:
                hook.remove()
        assert out.ids.shape[1] == completion_tokens and bool(out.truncated.all()), "EOS suppressed: full length"
        assert len(forwards) == completion_tokens, f"one prefill and C - 1 decoding forwards, got {len(forwards)}"
        return split[0] - start, end - split[0], forwards[1:]

    decoder = _timed_decoder_class()() if compiled else None
    start = time.perf_counter()
    rollout()  # warm-up (kernels, allocator, the cache's buffers; the compilation)
    warmup_s = time.perf_counter() - start
    timed = [rollout() for _ in range(ROLLOUT_REPEATS["cuda" if args.device.startswith("cuda") else "cpu"])]
    prefill_s, decode_s, fed = min(t[0] for t in timed), min(t[1] for t in timed), timed[0][2]
    step_ms = decode_s / (completion_tokens - 1) * 1e3
    completions = PROMPTS_PER_STEP * GROUP_SIZE
    bandwidth = copy_bandwidth(args.device)
    weight_bytes, kv_bytes = decode_bytes_per_step(model, vision, fed)
    bound_ms = (weight_bytes + kv_bytes) / (bandwidth * 1e9) * 1e3
    return {
        "compile_decode": "compiled" if compiled else "eager", "completions": completions,
        "padded_prompt_tokens": prompts.input_ids.shape[1],
        "warmup_s": warmup_s,  # the first rollout: with `compiled`, the compilation
        "completion_tokens": completion_tokens,
        "packed": fed[0][0] < completions,  # one row per prompt, its G completions side by side
        "prefill_ms": prefill_s * 1e3,  # the prompts' forward (image features cached) and the first token
        "decode_s": decode_s,  # the C - 1 decoding steps of the rollout
        "ms_per_token_step": step_ms,  # one decoding forward feeding N tokens, and their sampling
        "decode_tokens_per_s": completions / step_ms * 1e3,
        "copy_bandwidth_gb_s": bandwidth, "weight_bytes_per_step": weight_bytes, "kv_cache_bytes_per_step": kv_bytes,
        "bound_ms_per_step": bound_ms, "fraction_of_bound": bound_ms / step_ms,
    }


def own_forward_logprobs(family, model, rows: list[dict], batch, count: int):
    """[count, C] log-probs of the rollout's first `count` completions from one forward each over the
    unpadded prompt (encoded alone) + completion, the model computing its own positions."""
    import torch

    from grpo.logprobs import gather_logprobs
    from grpo.prompts import encode_prompts

    device = next(model.parameters()).device
    out = torch.zeros(count, batch.completion_ids.shape[1], device=device)
    for i in range(count):
        prompt = encode_prompts(family, [rows[i // GROUP_SIZE]], [i // GROUP_SIZE], 1 << 20).to(device)
        ids = batch.completion_ids[i : i + 1].to(device)
        length = int(batch.completion_mask[i].sum())
        ids = ids[:, :length]
        types = torch.cat([prompt.token_types, torch.zeros_like(ids)], 1)
        logits = model(input_ids=torch.cat([prompt.input_ids, ids], 1), attention_mask=torch.ones_like(types),
                       **family.forward_kwargs(types), **prompt.pixel_inputs()).logits
        logits = logits[:, prompt.input_ids.shape[1] - 1 : -1].float()
        out[i, :length] = gather_logprobs(logits, ids, 1.0)[0]
    return out.to(batch.completion_ids.device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny models of grpo/tiny.py (CI size), float32")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0 where the reference does not fit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--layers", type=int, default=0, help="shrink each shape to this many layers (0: the real depth)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the model's dtype (full shapes)")
    parser.add_argument("--own-forward", type=int, default=GROUP_SIZE,
                        help="completions also scored by the model's own unpadded forward (the reference)")
    parser.add_argument("--compile-decode", choices=["on", "off"], default="on",
                        help="also time decoding through grpo.decoding.StaticDecoder (compiled; CUDA graphs on a GPU)")
    parser.add_argument("--decode-only", action="store_true",
                        help="time decoding alone (no GRPO steps, no log-prob check)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer takes the GPU whenever it sees one
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu --tiny")
    report = {"benchmark": "gpu_check", "tiny": args.tiny, "device": args.device,
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "shapes": {}}
    for name in args.shapes:
        shape = {**SHAPES[name], **TINY} if args.tiny else SHAPES[name]
        result = run_shape(name, shape, args)
        report["shapes"][name] = result
        if not args.decode_only:
            print(f"{name}: {result['s_per_step']:.2f} s/step, {result['tokens_per_s']:.0f} tokens/s, "
                  f"max |shared - plain| {result['max_abs_logprob_diff_shared_vs_plain']:.2e}", flush=True)
            assert math.isfinite(result["s_per_step"])
        for mode, d in result["decode"].items():
            if "fallback" in d:
                print(f"{name} decode ({mode}): not compiled, {d['fallback']}", flush=True)
                continue
            read_gb = (d["weight_bytes_per_step"] + d["kv_cache_bytes_per_step"]) / 1e9
            print(f"{name} decode ({mode}): {d['ms_per_token_step']:.2f} ms per token step "
                  f"({d['decode_tokens_per_s']:.0f} tokens/s at N = {d['completions']}), "
                  f"prefill {d['prefill_ms']:.1f} ms; bound {d['bound_ms_per_step']:.3f} ms "
                  f"({read_gb:.3g} GB at {d['copy_bandwidth_gb_s']:.0f} GB/s): {d['fraction_of_bound']:.1%} of it",
                  flush=True)
        write(report, args.json)  # after every shape: a run cut off at its time limit keeps what it measured
    print(json.dumps(report, indent=1))
    return report


def write(report: dict, path: str | None):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
