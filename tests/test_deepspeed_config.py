"""DeepSpeed settings without launching processes: the config built from ours, the reference model's
config, and the example scripts' launcher arguments and model placement.

What a user relies on: numbers are given once (our config fills DeepSpeed's; "auto" is filled; a
different explicit value is an error naming the key), a DeepSpeed section we would silently ignore
or flip is an error naming it, and a correct explicit config is accepted for the reference model too.
"""

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from grpo.distributed import deepspeed_config, reference_deepspeed_config, zero_stage
from grpo.models import family_for
from grpo.loading import prepare_reference_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = dict(micro_batch_size=4, accumulation_steps=3, max_grad_norm=0.5)
# What OURS implies for one process.
EXPLICIT = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "train_batch_size": 12,
            "gradient_clipping": 0.5}


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_presets_take_batch_sizes_accumulation_clipping_and_bf16_from_our_config(preset):
    for bf16 in (False, True):
        config = deepspeed_config(preset, **OURS, bf16=bf16)
        assert {key: config[key] for key in EXPLICIT} == EXPLICIT
        assert config["bf16"] == {"enabled": bf16}
        assert zero_stage(config) == int(preset[-1])


def test_auto_values_are_filled_and_a_json_file_may_add_anything_else(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                "bf16": {"enabled": "auto"}, "wall_clock_breakdown": True,
                                **{key: "auto" for key in EXPLICIT}}))
    config = deepspeed_config(str(path), **OURS, bf16=True)
    assert {key: config[key] for key in EXPLICIT} == EXPLICIT
    assert config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert config["wall_clock_breakdown"] is True


def test_explicit_values_equal_to_ours_are_accepted():
    config = deepspeed_config({"zero_optimization": {"stage": 2}, **EXPLICIT, "bf16": {"enabled": False}}, **OURS, bf16=False)
    assert {key: config[key] for key in EXPLICIT} == EXPLICIT


@pytest.mark.parametrize("key", sorted(EXPLICIT))
def test_a_conflicting_explicit_value_is_an_error_naming_the_key(key):
    with pytest.raises(ValueError, match=f"{key}="):
        deepspeed_config({"zero_optimization": {"stage": 2}, key: 7}, **OURS, bf16=False)


@pytest.mark.parametrize("model_bf16", [False, True])
def test_bf16_that_contradicts_the_models_dtype_is_an_error_not_silently_flipped(model_bf16):
    spec = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": not model_bf16}}
    with pytest.raises(ValueError, match="bf16.enabled"):
        deepspeed_config(spec, **OURS, bf16=model_bf16)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_sections_are_errors_not_silently_ignored(section):
    spec = {"zero_optimization": {"stage": 2}, section: {"type": "AdamW", "params": {}}}
    with pytest.raises(ValueError, match=f"'{section}' section"):
        deepspeed_config(spec, **OURS, bf16=False)
    with pytest.raises(ValueError, match=f"'{section}' section"):
        reference_deepspeed_config(spec, bf16=False)


def test_offload_params_needs_stage_3():
    with pytest.raises(ValueError, match="stage 3"):
        deepspeed_config("zero2", **OURS, bf16=False, offload_params=True)
    zero = deepspeed_config("zero3", **OURS, bf16=False, offload_params=True, offload_optimizer=True)["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"


def test_an_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="zero2"):
        deepspeed_config("zero4", **OURS, bf16=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_reference_accepts_the_policys_explicit_batch_sizes(stage):
    # The reference never steps: the policy's batch sizes, accumulation and clipping are not its own.
    spec = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}, **EXPLICIT}
    config = reference_deepspeed_config(spec, bf16=False)
    assert zero_stage(config) == stage
    assert config["train_micro_batch_size_per_gpu"] == 1 and config["gradient_accumulation_steps"] == 1
    assert "offload_optimizer" not in config["zero_optimization"]  # no optimizer to offload
    assert spec["zero_optimization"]["offload_optimizer"]  # the user's dict is left as it was


def test_grpo_with_kl_accepts_a_correct_explicit_deepspeed_config_under_zero2(tiny_parts):
    # Regression: the reference's config was checked against a micro-batch of 1, so a correct
    # explicit train_micro_batch_size_per_gpu was reported as a conflict whenever beta > 0.
    model, processor = tiny_parts
    cfg = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}, **EXPLICIT}, dtype="auto", max_grad_norm=0.5)
    ref = prepare_reference_model(None, model, family_for(model, processor), cfg, torch.device("cpu"))
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))


# ---------------------------------------------------------------- the example scripts


def _load(path: str, name: str):
    directory = os.path.dirname(path)
    sys.path.insert(0, directory)  # the scripts import their siblings
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(directory)


@pytest.mark.parametrize("flag", ["--local_rank=1", "--local-rank=1"])
def test_example_scripts_accept_the_deepspeed_launchers_local_rank(flag):
    # `deepspeed script.py` appends --local_rank=N to the script's arguments.
    toy = _load(os.path.join(ROOT, "examples", "toy_pathology.py"), "toy_pathology_for_test")
    assert toy.parse_args(["--stage", "grpo", flag]).stage == "grpo"
    common = _load(os.path.join(ROOT, "examples", "pathvlm_r1", "common.py"), "pathvlm_common_for_test")
    assert common.parse_args("test", ["--config", "c.yaml", flag]).config == "c.yaml"


def test_pathvlm_load_policy_leaves_placement_to_the_trainer(tiny_parts, tmp_path, monkeypatch):
    # Under torchrun every process loads the model: moving it to "cuda" (= cuda:0) there put every
    # process's copy on GPU 0. With a GPU present, load_policy must leave the model where it is.
    model, processor = tiny_parts
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    common = _load(os.path.join(ROOT, "examples", "pathvlm_r1", "common.py"), "pathvlm_common_for_test")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        loaded, _ = common.load_policy(str(tmp_path), "float32")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    # With a device asked for (evaluation), the model goes there.
    monkeypatch.undo()
    loaded, _ = common.load_policy(str(tmp_path), "float32", device=torch.device("meta"))
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
