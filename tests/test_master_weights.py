"""bf16 full fine-tuning without DeepSpeed: fp32 master weights, on the tiny Qwen2.5-VL.

A bf16 number has 8 significant bits, so an AdamW step of ~lr (1e-6-1e-5) made on a bf16 weight of
magnitude 0.01 rounds to nothing. What a user relies on: with the default `master_weights=True` a
bf16 run moves the weights the way the fp32 run does; micro-batch gradients add up in fp32; a
resumed bf16 run is the uninterrupted one (the checkpoint carries the masters); a skipped
non-finite update moves neither masters nor moments; log-probs come from float32 logits.
"""

import copy
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from data import sft_target
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer, evaluate
from grpo.distributed import Optimization
from grpo.logprobs import gather_logprobs
from grpo.objective import grpo_loss
from grpo.checkpoints import load_checkpoint

BF16 = torch.bfloat16


def char_count(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def vowel_fraction(prompts, completions, **columns):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def sft_rows(toy_rows, n=16):
    return [{**row, "completion": sft_target(row)} for row in toy_rows[:n]]


def make_trainer(kind, model, processor, toy_rows, output_dir, **overrides):
    """A small SFT or GRPO trainer on `model` as it is (its dtype is the run's)."""
    if kind == "sft":
        settings = dict(output_dir=str(output_dir), batch_size=2, micro_batch_size=2, learning_rate=1e-5, max_steps=20,
                        save_steps=0, max_completion_length=32)
        return SFTTrainer(model, processor, sft_rows(toy_rows), SFTConfig(**{**settings, **overrides}))
    settings = dict(output_dir=str(output_dir), group_size=2, prompts_per_step=2, completions_per_micro_batch=4,
                    max_completion_length=8, learning_rate=1e-5, max_steps=20, save_steps=0, beta=0.0,
                    log_completions=0, seed=0)
    return Trainer(model, processor, [char_count], toy_rows[:16], GRPOConfig(**{**settings, **overrides}))


def trainable(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def bf16_spacing(weights: torch.Tensor) -> torch.Tensor:
    """The gap between consecutive bf16 numbers at |w| (its unit in the last place)."""
    return torch.finfo(BF16).eps * torch.exp2(torch.floor(torch.log2(weights.abs())))


def moved_fraction(before32, after32, before16, after16, min_magnitude=0.0) -> tuple[int, float]:
    """Of the weights (|w| >= min_magnitude) the fp32 run moved by more than bf16's spacing, how many
    there are and the fraction the bf16 run moved at all."""
    total = moved = 0
    for name, w in before32.items():
        chosen = ((after32[name] - w).abs() > bf16_spacing(w)) & (w.abs() >= min_magnitude)
        total += int(chosen.sum())
        moved += int((after16[name] != before16[name])[chosen].sum())
    return total, moved / max(1, total)


# ---------------------------------------------------------------- bf16 learns like fp32


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_bf16_run_moves_the_weights_the_fp32_run_moves_only_with_master_weights(tiny_parts, toy_rows, tmp_path, kind):
    """The same init (bf16-representable), 20 steps at lr 1e-5 in fp32 and in bf16. Measured (SFT / GRPO):
    with master weights 99.99% / 98.7% of the weights fp32 moves by more than bf16's spacing move in
    bf16 too, and 100% / 99.1% of those of magnitude >= 1/128; without, 27% / 46% (only the small
    weights, whose spacing is below one step) and none of magnitude >= 1/128.

    GRPO's bf16 run samples its own completions once bf16's rounding changes a draw (0.2-1.5% of draws
    at these logits), and from then on its updates differ from the fp32 run's. How early that happens
    depends on the random stream: GRPO seeds 0-3 gave 98.7 / 99.97 / 99.5 / 99.99% (moved) and
    99.1 / 100 / 99.9 / 100% (of magnitude >= 1/128)."""
    model, processor = tiny_parts
    start = copy.deepcopy(model).to(BF16)
    runs = {}
    for name, dtype, master in (("fp32", torch.float32, True), ("bf16", BF16, True), ("bf16-off", BF16, False)):
        trainer = make_trainer(kind, copy.deepcopy(start).to(dtype), processor, toy_rows, tmp_path / name,
                               master_weights=master)
        before = trainable(trainer.model)
        history = trainer.train()
        runs[name] = (before, trainable(trainer.model))
        assert all(math.isfinite(record["loss"]) for record in history)
    (before32, after32), on, off = runs["fp32"], runs["bf16"], runs["bf16-off"]
    assert all(value.dtype == torch.float32 for value in after32.values())
    assert all(value.dtype == BF16 for value in on[1].values())

    count, fraction_on = moved_fraction(before32, after32, *on)
    _, fraction_off = moved_fraction(before32, after32, *off)
    count_large, large_on = moved_fraction(before32, after32, *on, min_magnitude=1 / 128)
    _, large_off = moved_fraction(before32, after32, *off, min_magnitude=1 / 128)
    assert count > 10_000 and count_large > 5_000  # fp32 moves many weights past bf16's spacing
    assert fraction_on > 0.97 and large_on > 0.97, (fraction_on, large_on)
    assert large_off < 0.01 and fraction_off < 0.6, (large_off, fraction_off)


def test_micro_batch_gradients_add_up_in_fp32_and_tiny_steps_survive(tmp_path):
    """One update of 2 micro-batches on a bf16 / fp16 layer: the masters' gradient is the fp32 sum of
    the two (in bf16 or fp16, 1 + 2^-12 is 1), and a step of lr = 1e-5 moves the masters by 1e-5 even where
    the layer's own dtype cannot hold the change; without master weights the layer does not move."""
    cfg = SimpleNamespace(max_grad_norm=1e9, learning_rate=1e-5, weight_decay=0.0, adam_betas=(0.9, 0.999),
                          warmup_steps=0, lr_scheduler="constant", deepspeed=None, master_weights=True)
    for dtype in (BF16, torch.float16):
        layer = torch.nn.Linear(1, 1, bias=False).to(dtype)
        with torch.no_grad():
            layer.weight.fill_(0.5)  # bf16 spacing at 0.5: 2^-8 = 0.0039; fp16: 2^-11 = 0.00049
        opt = Optimization(layer, cfg, total_updates=1, micro_batches_per_update=2, micro_batch_size=1)
        opt.backward(layer(torch.ones(1, 1, dtype=dtype)).sum())  # d/dw = 1
        opt.backward(layer(torch.full((1, 1), 2.0**-12, dtype=dtype)).sum())  # d/dw = 2^-12
        (master,) = opt.master_weights.masters
        assert master.dtype == torch.float32 and layer.weight.grad is None
        assert master.grad.item() == 1 + 2.0**-12
        assert (torch.ones((), dtype=dtype) + 2.0**-12).item() == 1.0  # what accumulating in `dtype` would give
        opt.step()
        assert master.item() == pytest.approx(0.5 - 1e-5, abs=1e-7)  # Adam's first step: lr * sign(gradient)
        assert layer.weight.item() == 0.5  # the change is below the spacing: the model holds the rounded master

        plain = torch.nn.Linear(1, 1, bias=False).to(dtype)
        with torch.no_grad():
            plain.weight.fill_(0.5)
        opt = Optimization(plain, SimpleNamespace(**{**vars(cfg), "master_weights": False}), total_updates=10,
                           micro_batches_per_update=1, micro_batch_size=1)
        for _ in range(10):
            opt.backward(plain(torch.ones(1, 1, dtype=dtype)).sum())
            opt.step()
        assert opt.master_weights.masters[0] is plain.weight and plain.weight.item() == 0.5  # 10 steps rounded away


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_resumed_bf16_run_equals_the_uninterrupted_run_masters_included(tiny_parts, toy_rows, tmp_path, kind):
    model, processor = tiny_parts
    start = copy.deepcopy(model).to(BF16)
    settings = dict(max_steps=4, save_steps=2, lr_scheduler="cosine", warmup_steps=1)
    run_a = make_trainer(kind, copy.deepcopy(start), processor, toy_rows, tmp_path / "a", **settings)
    history_a = run_a.train()

    # The checkpoint carries the fp32 masters, which hold more than the bf16 weights saved beside them.
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "trainer_state.pt", weights_only=False)["master_weights"]
    names = [name for name, p in run_a.model.named_parameters() if p.requires_grad]
    assert list(saved) == names and all(value.dtype == torch.float32 for value in saved.values())
    assert any(not torch.equal(value, value.to(BF16).float()) for value in saved.values())

    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run_b = make_trainer(kind, copy.deepcopy(start), processor, toy_rows, tmp_path / "b", resume_from_checkpoint="latest",
                         **settings)
    history_b = run_b.train()
    assert [record["step"] for record in history_b] == [3, 4]
    for a, b in zip(history_a[2:], history_b):
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"] and b["lr"] == a["lr"], a["step"]
    masters_a, masters_b = run_a.opt.master_weights.state_dict(), run_b.opt.master_weights.state_dict()
    assert masters_a.keys() == masters_b.keys() and len(masters_a) == len(names)
    for name in masters_a:
        assert torch.equal(masters_b[name], masters_a[name]), name
    for name, value in run_a.model.state_dict().items():
        assert torch.equal(run_b.model.state_dict()[name], value), name
    moments_a, moments_b = run_a.opt.optimizer.state_dict()["state"], run_b.opt.optimizer.state_dict()["state"]
    assert all(torch.equal(moments_b[k]["exp_avg_sq"], moments_a[k]["exp_avg_sq"]) for k in moments_a)


def test_a_checkpoint_without_masters_resumes_from_its_bf16_weights(tiny_parts, toy_rows, tmp_path, capsys):
    """Switching master_weights on for a run that was written without them: the masters start from
    the checkpoint's weights (not from the model the trainer was built with), and the log says so."""
    model, processor = tiny_parts
    start = copy.deepcopy(model).to(BF16)
    written = make_trainer("sft", copy.deepcopy(start), processor, toy_rows, tmp_path, learning_rate=1e-3, max_steps=2,
                           master_weights=False)
    written.train()
    resumed = make_trainer("sft", copy.deepcopy(start), processor, toy_rows, tmp_path, learning_rate=1e-3, max_steps=3,
                           resume_from_checkpoint="latest")
    load_checkpoint(str(tmp_path / "checkpoint-2"), resumed.opt)
    assert "written without fp32 master weights and is resumed with" in capsys.readouterr().err
    for name, master in resumed.opt.master_weights.state_dict().items():
        assert torch.equal(master, written.model.get_parameter(name).float()), name


# ---------------------------------------------------------------- non-finite updates


def test_a_skipped_non_finite_update_moves_neither_masters_nor_moments(tiny_parts, toy_rows, tmp_path, monkeypatch):
    model, processor = tiny_parts
    trainer = make_trainer("sft", copy.deepcopy(model).to(BF16), processor, toy_rows, tmp_path, max_steps=3)
    real_loss = SFTTrainer.loss
    monkeypatch.setattr(SFTTrainer, "loss",
                        lambda self, *args: real_loss(self, *args) * (float("nan") if self.step == 1 else 1.0))

    def snapshot():
        return {"masters": {k: v.clone() for k, v in trainer.opt.master_weights.state_dict().items()},
                "weights": trainable(trainer.model),
                "optimizer": copy.deepcopy(trainer.opt.optimizer.state_dict()["state"]),
                "lr_step": trainer.opt.scheduler.last_epoch}

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    updates, real_step = [], trainer.opt.step

    def step():
        before = snapshot()
        grad_norm = real_step()
        updates.append((before, snapshot(), grad_norm))
        return grad_norm

    trainer.opt.step = step
    history = trainer.train()
    assert [same(before, after) for before, after, _ in updates] == [False, True, False]
    assert math.isnan(updates[1][2]) and history[1]["skipped_update"].startswith("loss=nan")
    assert all(master.grad is None for master in trainer.opt.master_weights.masters)  # nothing left for the next step
    # A real update moves every master (the bf16 weights only where the change reaches their spacing).
    before, after, _ = updates[2]
    assert all(not torch.equal(after["masters"][k], before["masters"][k]) for k in before["masters"])


# ---------------------------------------------------------------- end to end, and float32 log-probs


def test_bf16_sft_grpo_and_evaluate_end_to_end(tiny_parts, toy_rows, tmp_path):
    model, processor = tiny_parts
    sft = make_trainer("sft", copy.deepcopy(model).to(BF16), processor, toy_rows, tmp_path / "sft", learning_rate=1e-3,
                       max_steps=4)
    before = trainable(sft.model)
    losses = [record["loss"] for record in sft.train()]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    after = trainable(sft.model)
    assert all(value.dtype == BF16 and not torch.equal(value, before[name]) for name, value in after.items())
    state = sft.opt.optimizer.state_dict()["state"]
    assert all(moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float32 for moments in state.values())

    grpo = make_trainer("grpo", sft.model, processor, toy_rows, tmp_path / "grpo", learning_rate=1e-3, max_steps=3,
                        beta=0.04)
    history = grpo.train()
    assert all(math.isfinite(record["loss"]) and math.isfinite(record["kl"]) for record in history)
    assert abs(history[0]["kl"]) < 1e-6 and history[-1]["kl"] > 0  # the bf16 reference is the starting policy
    assert all(not torch.equal(p, after[name]) for name, p in trainable(grpo.model).items())

    result = evaluate(grpo.model, processor, toy_rows[:4], [vowel_fraction], batch_size=4, max_completion_length=8)
    completions = [record["completion"] for record in result["records"]]
    assert len(completions) == 4 and all(1 <= record["tokens"] <= 8 for record in result["records"])
    assert result["vowel_fraction"] == pytest.approx(sum(vowel_fraction(None, completions)) / 4)
    again = evaluate(grpo.model, processor, toy_rows[:4], [vowel_fraction], batch_size=2, max_completion_length=8)
    assert [record["completion"] for record in again["records"]] == completions  # greedy, whatever the batching


def test_log_probs_ratio_and_kl_of_a_bf16_model_are_float32():
    """bf16 logits are upcast before the log-softmax: the log-probs equal a float64 computation from
    the same logits, where a bf16 log-softmax is off by up to its spacing at the logits' size."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 300, generator=generator) * 8).to(BF16)  # [N, C, V]
    ids = torch.randint(0, 300, (2, 5), generator=generator)
    logprobs, entropies = gather_logprobs(logits, ids, temperature=0.7, with_entropy=True)
    assert logprobs.dtype == entropies.dtype == torch.float32
    exact = torch.log_softmax(logits.double() / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), exact, rtol=0, atol=1e-5)
    in_bf16 = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    assert (in_bf16.double() - exact).abs().max() > 1e-2  # what the upcast avoids

    # The ratio and the k3 KL run in float32 too: k3 of a log-ratio of 0.1 is 0.00517 (in bf16: 0).
    loss, stats = grpo_loss(logprobs, logprobs.detach() - 1e-3, torch.tensor([1.0, -1.0]), torch.ones(2, 5),
                            ref_logprobs=logprobs.detach() + 0.1, beta=0.04)
    assert loss.dtype == stats["kl"].dtype == torch.float32
    assert stats["kl"].item() == pytest.approx(math.exp(0.1) - 0.1 - 1, rel=1e-3)


def test_master_weights_settings(tiny_parts, toy_rows, tmp_path):
    """Refused under DeepSpeed when off; no copies of an fp32 model; under LoRA only the bf16
    modules a user trains whole get copies (PEFT keeps the adapter itself in fp32)."""
    with pytest.raises(ValueError, match="master_weights=False applies without DeepSpeed only"):
        SFTConfig(master_weights=False, deepspeed="zero2")
    model, processor = tiny_parts
    fp32 = make_trainer("sft", copy.deepcopy(model), processor, toy_rows, tmp_path / "a")
    assert fp32.opt.master_weights.state_dict() == {}
    assert all(m is p for m, p in zip(fp32.opt.master_weights.masters, fp32.opt.master_weights.params))
    pytest.importorskip("peft")
    adapter = make_trainer("sft", copy.deepcopy(model).to(BF16), processor, toy_rows, tmp_path / "b", lora={"r": 4})
    assert adapter.opt.master_weights.state_dict() == {}
    assert all(p.dtype == torch.float32 for p in adapter.opt.master_weights.params)
    head = make_trainer("sft", copy.deepcopy(model).to(BF16), processor, toy_rows, tmp_path / "c",
                        lora={"r": 4, "modules_to_save": ["lm_head"]})
    copied = list(head.opt.master_weights.state_dict())
    assert copied and all("modules_to_save" in name for name in copied)
