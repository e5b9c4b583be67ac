"""LoRA through PEFT (grpo/lora.py): what a user relies on.

The reference is the frozen base (no second model), before and after training; the base weights
never move, only the adapter does; the adapter trains on every family's language model and not its
vision tower; the fast path and gradient checkpointing give the plain path's numbers; a checkpoint's
adapter reloads with plain PEFT (and merged, with plain transformers) to the same log-probs; a LoRA
run resumes exactly; an adapter from an earlier stage continues with that stage as its reference;
bad settings fail saying what was found.
"""

import copy
import importlib.util
import json
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")

from data import make_toy_dataset, sft_target, to_prompt_rows  # noqa: E402
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer, completion_logprobs  # noqa: E402
from grpo.lora import REFERENCE  # noqa: E402
from grpo.models import family_for, unwrap  # noqa: E402
from grpo.tiny import FAMILIES, build_tiny_model_and_processor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DROPOUT = {"dropout": 0.0}  # dropout draws a different mask per forward: exact comparisons turn it off


def char_count(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def small_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, completions_per_micro_batch=2,
                    max_completion_length=8, learning_rate=1e-2, max_steps=2, save_steps=0, seed=0, beta=0.04,
                    lora=NO_DROPOUT)
    settings.update(overrides)
    return GRPOConfig(**settings)


def base_weights(model) -> dict:
    """The base model's weights under their plain names (PEFT renames a wrapped layer's to base_layer)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unwrap(model).state_dict().items()
            if "lora_" not in k}


def completions_of(batch, group_size):
    """The rollout's completions as token lists per prompt, for completion_logprobs."""
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids, batch.completion_mask)]
    return [ids[i : i + group_size] for i in range(0, len(ids), group_size)]


def merge_script():
    spec = importlib.util.spec_from_file_location("merge_lora_script", os.path.join(ROOT, "examples", "merge_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomise_adapters(model, seed=0):
    """Nonzero adapter weights (PEFT starts B at zero: the adapter would change nothing yet)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


# ---------------------------------------------------------------- reference, base and adapter weights


def test_reference_is_the_frozen_base_before_and_after_training_and_only_the_adapter_moves(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    frozen = copy.deepcopy(model).eval()
    before = base_weights(model)
    trainer = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8], small_config(tmp_path, max_steps=3))
    assert trainer.ref_model is None and trainer.ref_shares_vision  # no second model; vision untouched by LoRA
    adapter_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapter_before and all("lora_" in n for n in adapter_before)
    assert not any("visual" in n for n in adapter_before)  # the vision tower carries no adapter

    def check_reference(step):
        rows, indices = trainer._rows_for_step(step)
        batch = trainer.rollout(rows, indices, torch.Generator().manual_seed(step))
        trainer.logprob_passes(batch)
        expected = completion_logprobs(frozen, processor, rows, completions_of(batch, 2), shared_prefix=False)
        for k, logprobs in enumerate(l for group in expected for l in group):
            n = len(logprobs)
            torch.testing.assert_close(batch.ref_logprobs[k, :n], logprobs, atol=1e-5, rtol=1e-5)
        return batch

    check_reference(0)
    history = trainer.train()
    assert abs(history[0]["kl"]) < 1e-7 and history[-1]["kl"] > 0  # reference = the policy as it started
    check_reference(3)
    after = base_weights(trainer.model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"base weight {name} changed"
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert any("lora_B" in n for n in moved) and len(moved) == len(adapter_before)


# ---------------------------------------------------------------- every family


# Every family of the registry but qwen2_vl, left out for time: it is Qwen2.5-VL's family class with
# Qwen2.5-VL's language model, the only part LoRA adapts.
@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "qwen2_vl"])
def test_lora_on_every_family_targets_the_language_model_and_keeps_both_paths_exact(family, tmp_path):
    rows = to_prompt_rows(make_toy_dataset(4, seed=3, image_size=56), source="toy")
    model, processor = build_tiny_model_and_processor(seed=0, family=family, min_pixels=56 * 56, max_pixels=56 * 56)
    trainer = Trainer(model, processor, [char_count], rows, small_config(tmp_path, max_steps=1, prompts_per_step=2))
    peft_model = trainer.model
    fam = family_for(peft_model, processor, quiet=True)
    vision = {id(m) for v in fam.vision_modules(peft_model) for m in v.modules()}
    head = unwrap(peft_model).get_output_embeddings()
    adapted = {name: m for name, m in unwrap(peft_model).named_modules() if hasattr(m, "lora_A")}
    plain_linears = [n for n, m in unwrap(peft_model).named_modules()
                     if type(m) is torch.nn.Linear and m is not head and id(m) not in vision
                     and not any(n.startswith(a + ".") for a in adapted)]
    assert adapted and not plain_linears  # every language-model Linear has an adapter ...
    assert not any(id(m) in vision for m in adapted.values())  # ... and no vision module has one
    history = trainer.train()
    assert abs(history[0]["kl"]) < 1e-7

    # Adapters on, shared-prefix and plain log-probs equal the merged model's own (float64).
    peft_model = copy.deepcopy(peft_model).double().eval()
    randomise_adapters(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    g = torch.Generator().manual_seed(0)
    vocab = len(processor.tokenizer)
    completions = [[torch.randint(20, vocab, (n,), generator=g).tolist() for n in (1, 5)] for _ in rows[:2]]
    with torch.no_grad():
        shared = completion_logprobs(peft_model, processor, rows[:2], completions, shared_prefix=True)
        plain = completion_logprobs(peft_model, processor, rows[:2], completions, shared_prefix=False)
        reference = completion_logprobs(merged, processor, rows[:2], completions, shared_prefix=False)
        with peft_model.disable_adapter():
            base = completion_logprobs(peft_model, processor, rows[:2], completions, shared_prefix=False)
    for s, p, r, b in zip(*(sum(x, []) for x in (shared, plain, reference, base))):
        torch.testing.assert_close(s, r, atol=1e-6, rtol=1e-6, msg=family)
        torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6, msg=family)
    assert any(not torch.allclose(p, b, atol=1e-3) for p, b in zip(sum(plain, []), sum(base, [])))  # adapters act


def test_shared_prefix_and_gradient_checkpointing_give_the_plain_paths_adapter_gradients(tiny_parts, toy_rows, tmp_path):
    from grpo.loading import prepare_model

    model, processor = tiny_parts
    rows = toy_rows[:2]
    ids = [[[40, 41, 42, 43], [44, 45]], [[50, 51, 52], [53]]]

    def adapter_grads(shared_prefix, checkpointing):
        cfg = small_config(tmp_path, gradient_checkpointing=checkpointing)
        peft_model, _, _ = prepare_model(copy.deepcopy(model).double(), processor, cfg, torch.device("cpu"))
        randomise_adapters(peft_model)
        peft_model.train()
        logprobs = completion_logprobs(peft_model, processor, rows, ids, shared_prefix=shared_prefix)
        torch.stack([l.sum() for group in logprobs for l in group]).sum().backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain = adapter_grads(False, False)
    assert plain and all(g.abs().sum() > 0 for n, g in plain.items() if "lora_A" in n)
    # Log-probs are gathered in float32 (as in training): gradients agree to float32 rounding.
    scale = max(float(g.abs().max()) for g in plain.values())
    for shared_prefix, checkpointing in ((True, False), (False, True)):
        got = adapter_grads(shared_prefix, checkpointing)
        assert got.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(got[name], grad, atol=1e-6 * scale, rtol=1e-5, msg=f"{name} {shared_prefix} {checkpointing}")


# ---------------------------------------------------------------- checkpoints, merging, resume


def test_checkpoint_adapter_reloads_with_plain_peft_and_merges_to_the_same_logprobs(tiny_parts, toy_rows, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = tiny_parts
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)  # so the adapter names its base: adapter_config.json's base_model_name_or_path
    processor.save_pretrained(base_dir)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    trainer = Trainer(base, processor, [char_count], toy_rows[:8], small_config(tmp_path / "run"))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "rng_state_0.pt"} <= {
        p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()  # the adapter only, not the base
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == 16 and config["lora_alpha"] == 32

    rows = toy_rows[:3]
    completions = [[[40, 41, 42, 43, 44], [45]], [[50, 51]], [[60, 61, 62]]]
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = completion_logprobs(trained, processor, rows, completions)
        reloaded = peft.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), checkpoint).eval()
        got = completion_logprobs(reloaded, processor, rows, completions)
        merged_dir = merge_script().main([str(checkpoint), str(tmp_path / "merged")])  # grpo.merge_lora, base from the adapter
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
        assert not any("lora" in k for k in merged.state_dict())
        from_merged = completion_logprobs(merged, processor, rows, completions)
        with trained.disable_adapter():
            base_logprobs = completion_logprobs(trained, processor, rows, completions)
    for e, g, m, b in zip(*(sum(x, []) for x in (expected, got, from_merged, base_logprobs))):
        assert torch.equal(g, e)
        torch.testing.assert_close(m, e, atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(e, b, atol=1e-4) for e, b in zip(sum(expected, []), sum(base_logprobs, [])))
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()  # the processor came along


def test_resumed_lora_run_equals_the_uninterrupted_run(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    # With dropout: its masks come from the RNG state the checkpoint restores.
    settings = dict(max_steps=4, save_steps=2, seed=3, num_iterations=2, lr_scheduler="cosine", warmup_steps=1,
                    lora={"r": 8, "dropout": 0.05}, learning_rate=5e-3)
    run_a = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8], small_config(tmp_path / "a", **settings))
    history_a = run_a.train()
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run_b = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8],
                    small_config(tmp_path / "b", resume_from_checkpoint="latest", **settings))
    history_b = run_b.train()
    assert [m["step"] for m in history_b] == [3, 4]
    for a, b in zip(history_a[2:], history_b):
        for key in ("reward", "loss", "kl", "clip_ratio", "grad_norm", "lr", "completion_length/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert history_a[-1]["clip_ratio"] > 0 or history_a[-1]["kl"] > 0  # the adapter did move
    final_a, final_b = (dict(run.model.named_parameters()) for run in (run_a, run_b))
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- the staged pipeline


def test_staged_pipeline_continued_adapter_has_alpha_as_reference_and_fresh_adapter_on_merged_alpha(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:8]]
    sft = SFTTrainer(copy.deepcopy(model), processor, rows, SFTConfig(
        output_dir=str(tmp_path / "alpha"), batch_size=2, micro_batch_size=2, max_steps=2, learning_rate=1e-2,
        lora=NO_DROPOUT, save_steps=0))
    sft.train()
    alpha = sft.model  # a PeftModel: base + the Alpha adapter
    alpha_frozen = copy.deepcopy(alpha).merge_and_unload().eval()

    # (a) Continue the Alpha adapter (lora=None): the reference is Alpha, the "reference" adapter frozen.
    beta = Trainer(copy.deepcopy(alpha), processor, [char_count], toy_rows[:8],
                   small_config(tmp_path / "beta_a", lora=None, max_steps=3))
    assert set(beta.model.peft_config) == {"default", REFERENCE} and beta.model.active_adapter == "default"
    trainable = [n for n, p in beta.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    reference_before = {n: p.clone() for n, p in beta.model.named_parameters() if f".{REFERENCE}." in n}

    def check_reference(trainer, expected_model, step):
        rows_, indices = trainer._rows_for_step(step)
        batch = trainer.rollout(rows_, indices, torch.Generator().manual_seed(step))
        trainer.logprob_passes(batch)
        expected = completion_logprobs(expected_model, processor, rows_, completions_of(batch, 2), shared_prefix=False)
        for k, logprobs in enumerate(l for group in expected for l in group):
            torch.testing.assert_close(batch.ref_logprobs[k, : len(logprobs)], logprobs, atol=1e-5, rtol=1e-5)

    check_reference(beta, alpha_frozen, 0)
    history = beta.train()
    assert abs(history[0]["kl"]) < 1e-7 and history[-1]["kl"] > 0
    check_reference(beta, alpha_frozen, 3)
    for name, value in beta.model.named_parameters():
        if f".{REFERENCE}." in name:
            assert torch.equal(value, reference_before[name]), name
    # The checkpoint holds the trained adapter only, loadable on the base as Beta.
    checkpoint = tmp_path / "beta_a" / "checkpoint-3"
    assert not (checkpoint / REFERENCE).exists()

    # (b) A fresh adapter on the merged Alpha: the reference is the adapters-off policy = merged Alpha.
    beta_b = Trainer(copy.deepcopy(alpha).merge_and_unload(), processor, [char_count], toy_rows[:8],
                     small_config(tmp_path / "beta_b", max_steps=2))
    assert list(beta_b.model.peft_config) == ["default"]
    check_reference(beta_b, alpha_frozen, 0)
    beta_b.train()
    check_reference(beta_b, alpha_frozen, 2)


# ---------------------------------------------------------------- bad input


def test_lora_settings_errors_say_what_was_found(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    with pytest.raises(ValueError, match="unknown key 'rank'"):
        GRPOConfig(lora={"rank": 8})
    with pytest.raises(ValueError, match=r"'q_projj' matches no module of Qwen2_5_VLForConditionalGeneration.*q_proj.*"
                                         r"in the language model and .*qkv.* in the vision modules"):
        Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:4],
                small_config(tmp_path, lora={"target_modules": ["q_proj", "q_projj"]}))
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"already a PeftModel with adapter\(s\) \['default'\] \(default: LoraConfig r=4\).*"
                                         r"lora=None.*merge"):
        Trainer(wrapped, processor, [char_count], toy_rows[:4], small_config(tmp_path))
    # Explicit targets reach the vision tower when asked; a peft.LoraConfig is accepted as it is.
    trainer = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:4],
                      small_config(tmp_path, lora=peft.LoraConfig(r=4, target_modules=["qkv", "q_proj"])))
    assert trainer.vision_trains and not trainer.ref_shares_vision
    # lora_vision: every Linear of the vision tower and the merger too (not the GELU between the merger's Linears).
    trainer = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:4], small_config(tmp_path, lora={"lora_vision": True}))
    visual = unwrap(trainer.model).model.visual
    assert all(name.endswith("base_layer") for name, m in visual.named_modules()
               if type(m) is torch.nn.Linear and "lora_" not in name)
    assert hasattr(visual.merger.mlp[0], "lora_A") and not hasattr(visual.merger.mlp[1], "lora_A")
    assert trainer.vision_trains and not trainer.ref_shares_vision
