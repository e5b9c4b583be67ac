"""benchmarks/gpu_check.py at CI size: the script a GPU machine runs works end to end on CPU.

`--device cpu --tiny` runs every shape (Qwen2.5-VL, Qwen3-VL, Gemma 3) on the tiny builders of
grpo/tiny.py through the same code as the real-size run: decoding timed alone against the bandwidth
bound, 3 GRPO steps of the Trainer, then one rollout scored on the shared-prefix and the plain path.
"""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main sets it for --device cpu; restored after the test
    gpu_check = load_gpu_check()
    path = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--tiny", "--json", str(path)])
    report = json.loads(path.read_text())

    assert set(report["shapes"]) == set(gpu_check.SHAPES)
    for name, result in report["shapes"].items():
        assert result["family"] == gpu_check.SHAPES[name]["family"]
        assert len(result["step_s"]) == gpu_check.STEPS
        assert math.isfinite(result["s_per_step"]) and result["s_per_step"] > 0, name
        assert result["tokens_per_s"] > 0, name
        assert result["visual_tokens_per_prompt"] > 0, name  # the prompts carry their image
        # The fast path's log-probs are the plain path's (float32): the number the GPU run reports at bf16.
        assert result["max_abs_logprob_diff_shared_vs_plain"] < 1e-3, (name, result["max_abs_logprob_diff_shared_vs_plain"])
        check_decode(gpu_check, name, result)
        check_compiled_decode(gpu_check, name, result)


def check_compiled_decode(gpu_check, name: str, result: dict):
    """The compiled decode record (grpo.decoding.StaticDecoder): the same quantities, the attention
    reading the whole preallocated cache at every step (a sliding-window layer counted up to its window).
    Gemma 3 decodes unpacked: N rows, each the prompt and one completion."""
    from grpo.decoding import StaticDecoder
    from grpo.tiny import build_tiny_model_and_processor

    compiled = result["decode"]["compiled"]
    assert "fallback" not in compiled, (name, compiled)
    packed = result["family"] != "gemma3"
    assert compiled["compile_decode"] == "compiled" and compiled["packed"] == packed
    assert compiled["ms_per_token_step"] > 0 and compiled["warmup_s"] > 0
    assert compiled["decode_tokens_per_s"] == pytest.approx(compiled["completions"] / compiled["ms_per_token_step"] * 1e3)
    config = build_tiny_model_and_processor(family=result["family"])[0].config.get_text_config()
    fed_per_row = compiled["completion_tokens"] * (gpu_check.GROUP_SIZE if packed else 1)
    length = StaticDecoder().cache_length(compiled["padded_prompt_tokens"], fed_per_row)
    rows = gpu_check.PROMPTS_PER_STEP * (1 if packed else gpu_check.GROUP_SIZE)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    slots = sum(min(length, config.sliding_window) if kind == "sliding_attention" else length for kind in layer_types)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = rows * slots * 2 * config.num_key_value_heads * head_dim * 4
    assert compiled["kv_cache_bytes_per_step"] == expected, name


def test_decode_only_skips_the_grpo_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpu_check = load_gpu_check()
    report = gpu_check.main(["--device", "cpu", "--tiny", "--decode-only", "--shapes", "gemma3_4b"])

    result = report["shapes"]["gemma3_4b"]
    assert "s_per_step" not in result and "max_abs_logprob_diff_shared_vs_plain" not in result
    check_decode(gpu_check, "gemma3_4b", result)
    check_compiled_decode(gpu_check, "gemma3_4b", result)


def check_decode(gpu_check, name: str, result: dict):
    """The eager decode record: positive times, tokens/s = N / step time, the bound's bytes as counted
    from the tiny model's config, and a measured step no faster than that bound allows."""
    from grpo.tiny import build_tiny_model_and_processor

    decode = result["decode"]["eager"]
    assert decode["compile_decode"] == "eager"
    completions = gpu_check.GROUP_SIZE * gpu_check.PROMPTS_PER_STEP
    assert decode["completions"] == completions
    assert decode["prefill_ms"] > 0 and decode["decode_s"] > 0 and decode["ms_per_token_step"] > 0, (name, decode)
    assert decode["ms_per_token_step"] == pytest.approx(decode["decode_s"] * 1e3 / (decode["completion_tokens"] - 1))
    assert decode["decode_tokens_per_s"] == pytest.approx(completions / decode["ms_per_token_step"] * 1e3)
    assert decode["copy_bandwidth_gb_s"] > 0
    assert 0 < decode["fraction_of_bound"] <= 1.5, (name, decode["fraction_of_bound"])
    assert decode["bound_ms_per_step"] == pytest.approx(
        (decode["weight_bytes_per_step"] + decode["kv_cache_bytes_per_step"]) / (decode["copy_bandwidth_gb_s"] * 1e6))

    # The tiny models tie their embeddings and run in float32: a step reads every language-model weight once.
    assert decode["weight_bytes_per_step"] == 4 * result["trainable_parameters"], name
    # The KV cache, from the config: Qwen packs a prompt's G completions in one row (B rows of P + (s + 1) G
    # slots at step s), Gemma 3's sliding-window layers cannot (N rows of P + s + 1; its window is full).
    model, _ = build_tiny_model_and_processor(family=result["family"])
    config = model.config.get_text_config()
    prompt, length = decode["padded_prompt_tokens"], decode["completion_tokens"]
    mean_step = length / 2  # completion slots attended, averaged over steps s = 0 .. C - 2: mean of s + 1
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if result["family"] == "gemma3":
        assert not decode["packed"]
        assert prompt > config.sliding_window
        slots = completions * sum(prompt + mean_step if kind == "full_attention" else config.sliding_window
                                  for kind in layer_types)
    else:
        assert decode["packed"]
        slots = gpu_check.PROMPTS_PER_STEP * len(layer_types) * (prompt + gpu_check.GROUP_SIZE * mean_step)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert decode["kv_cache_bytes_per_step"] == int(slots * 2 * config.num_key_value_heads * head_dim * 4), name
