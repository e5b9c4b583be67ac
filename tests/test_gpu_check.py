"""benchmarks/gpu_check.py at CI size: the script a GPU machine runs works end to end on CPU.

`--device cpu --tiny` runs every shape (Qwen2.5-VL, Qwen3-VL, Gemma 3) on the tiny builders of
grpo/tiny.py through the same code as the real-size run: 3 GRPO steps of the Trainer, then one rollout
scored on the shared-prefix and the plain path.
"""

import importlib.util
import json
import math
import os

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
