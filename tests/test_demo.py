"""The staged demo end to end (minutes each, so marked slow: `pytest -m slow tests/test_demo.py`).

What a user checks first: on a tiny model of each family, SFT learns the task above chance and
GRPO raises held-out accuracy above SFT's, with the format kept.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
# Three families, not all, for time (each run takes minutes): the default Qwen2.5-VL, Qwen3-VL (DeepStack,
# 16-px patches) and Gemma 3 (another chat format, fixed-size images).
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3"])
def test_demo_grpo_beats_sft(family, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "toy_pathology.py"), "--family", family,
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert stages["sft"]["accuracy"] > stages["base"]["accuracy"] + 0.2, stages
    assert stages["grpo"]["accuracy"] > stages["sft"]["accuracy"], stages
    assert stages["grpo"]["format"] == 1.0 and stages["grpo_judge"]["accuracy"] >= stages["grpo"]["accuracy"] - 0.02, stages
