"""Long runs on a cluster, on the tiny Qwen2.5-VL: what a user relies on when a job is stopped, a
step goes non-finite or the disk fills up.

A stop signal finishes the step, writes a complete checkpoint (a second signal during the save
changes nothing) and raises Preempted (exit status 75); a non-finite update leaves the weights and
optimizer state bit-identical and is counted, and too many in a row stop the run with the last good
state saved; a failed save costs nothing earlier. The subprocess and 2-process (one process
signalled) versions are in tests/test_distributed.py; a bad reward value (named with its function,
completion and row) is in tests/test_scoring.py.
"""

import copy
import errno
import json
import os
import signal

import pytest
import torch

from data import sft_target
from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer
from grpo.resilience import EXIT_PREEMPTED, NonFiniteUpdateError, Preempted
from grpo.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint
from grpo.tracking import JsonlLog


def char_count(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def small_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, completions_per_micro_batch=2,
                    max_completion_length=8, learning_rate=1e-3, max_steps=3, save_steps=0, seed=0, beta=0.0,
                    log_completions=0, lr_scheduler="cosine", warmup_steps=1)
    settings.update(overrides)
    return GRPOConfig(**settings)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def snapshot(trainer) -> dict:
    """Weights, AdamW state (moments and step counts) and LR schedule, cloned."""
    return {"weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.opt.optimizer.state_dict()),
            "scheduler": copy.deepcopy(trainer.opt.scheduler.state_dict())}


def identical(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def record_updates(trainer) -> list:
    """(state before, state after) of every update the trainer makes, appended as it trains."""
    updates, real_step = [], trainer.opt.step

    def step():
        before = snapshot(trainer)
        grad_norm = real_step()
        updates.append((before, snapshot(trainer)))
        return grad_norm

    trainer.opt.step = step
    return updates


# ---------------------------------------------------------------- non-finite steps


def test_a_nan_loss_skips_the_update_bit_identically_and_three_in_a_row_stop_the_run(tiny_parts, toy_rows, tmp_path,
                                                                                     monkeypatch):
    import grpo.trainer

    model, processor = tiny_parts
    trainer = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8], small_config(tmp_path, max_steps=8))
    real_loss, nan_steps = grpo.trainer.grpo_loss, {2, 4, 5, 6}

    def grpo_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan") if trainer.step + 1 in nan_steps else loss), stats

    monkeypatch.setattr(grpo.trainer, "grpo_loss", grpo_loss)
    updates = record_updates(trainer)
    with pytest.raises(NonFiniteUpdateError, match=r"3 steps in a row \(4, 5, 6\).*max_consecutive_bad_steps=3") as error:
        trainer.train()
    assert str(tmp_path / "checkpoint-6") in str(error.value)

    # Skipped updates (steps 2, 4, 5, 6) leave weights, AdamW state and LR schedule bit-identical; the others move all.
    assert len(updates) == 6
    for step, (before, after) in enumerate(updates, start=1):
        assert identical(before, after) == (step in nan_steps), step
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3, 4]
    rows = [row["id"] for row in trainer._rows_for_step(1)[0]]
    assert records[1]["skipped_update"] == "loss=nan, grad_norm=nan" and records[1]["skipped_rows"] == rows
    assert "skipped_update" not in records[2]
    # The checkpoint the error names holds the state after step 3, the last good update.
    saved = torch.load(tmp_path / "checkpoint-6" / "trainer_state.pt", weights_only=False)
    assert saved["step"] == 6 and saved["skipped_steps"] == 4 and saved["bad_steps"] == [4, 5, 6]
    assert identical(saved["optimizer"], updates[2][1]["optimizer"])
    loaded = type(trainer.model).from_pretrained(tmp_path / "checkpoint-6").state_dict()
    assert identical(loaded, updates[2][1]["weights"])


def test_sft_skips_non_finite_updates_and_stops_after_the_configured_run_of_them(tiny_parts, toy_rows, tmp_path,
                                                                                  monkeypatch):
    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:8]]
    cfg = SFTConfig(output_dir=str(tmp_path), batch_size=2, micro_batch_size=1, learning_rate=1e-3, max_steps=5,
                    save_steps=0, max_consecutive_bad_steps=2, max_completion_length=16)
    trainer = SFTTrainer(copy.deepcopy(model), processor, rows, cfg)
    real_loss = SFTTrainer.loss

    def loss(self, *args):
        value = real_loss(self, *args)
        return value * float("inf") if self.step >= 1 else value  # inf from step 2 on (inf x 0 gradients are NaN)

    monkeypatch.setattr(SFTTrainer, "loss", loss)
    updates = record_updates(trainer)
    with pytest.raises(NonFiniteUpdateError, match=r"2 steps in a row \(2, 3\)"):
        trainer.train()
    assert [identical(before, after) for before, after in updates] == [False, True, True]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 2] and records[2]["skipped_update"].startswith("loss=inf")
    assert torch.load(tmp_path / "checkpoint-3" / "trainer_state.pt", weights_only=False)["step"] == 3


# ---------------------------------------------------------------- stop signals


def test_signals_only_set_a_flag_so_a_second_one_during_the_save_leaves_it_complete(tiny_parts, toy_rows, tmp_path,
                                                                                     monkeypatch):
    model, processor = tiny_parts
    previous = signal.getsignal(signal.SIGTERM)
    calls = []

    def signalling(prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # while step 2 is scored
        return char_count(prompts, completions)

    trainer = Trainer(copy.deepcopy(model), processor, [signalling], toy_rows[:8], small_config(tmp_path, max_steps=5))
    real_save = trainer.model.save_pretrained

    def save_pretrained(path, **kwargs):
        real_save(path, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal half-way through the checkpoint
        torch.save({"more": "files"}, os.path.join(path, "written_after_the_signal.pt"))

    monkeypatch.setattr(trainer.model, "save_pretrained", save_pretrained)
    with pytest.raises(Preempted) as stop:
        trainer.train()
    assert isinstance(stop.value, SystemExit) and stop.value.code == EXIT_PREEMPTED == 75
    assert (stop.value.signal_name, stop.value.step, stop.value.checkpoint) == ("SIGUSR1", 2, str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "completions.jsonl", "metrics.jsonl"]
    assert "written_after_the_signal.pt" in os.listdir(tmp_path / "checkpoint-2")
    assert load_checkpoint(str(tmp_path / "checkpoint-2"), trainer.opt)["step"] == 2
    assert [r.get("stopped_by") for r in read_jsonl(tmp_path / "metrics.jsonl")] == [None, "SIGUSR1"]
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers are the caller's again


def test_stop_signal_settings_are_checked():
    with pytest.raises(ValueError, match=r"stop_signals: 'SIGFOO' is not a signal name"):
        GRPOConfig(stop_signals=("SIGTERM", "SIGFOO"))
    with pytest.raises(ValueError, match=r"SIGKILL cannot be caught"):
        SFTConfig(stop_signals=("SIGKILL",))
    with pytest.raises(ValueError, match=r"max_consecutive_bad_steps must be >= 1, got 0"):
        GRPOConfig(max_consecutive_bad_steps=0)


# ---------------------------------------------------------------- saves


def test_a_save_failing_half_way_keeps_the_previous_checkpoint_as_latest(tiny_parts, toy_rows, tmp_path, monkeypatch):
    model, processor = tiny_parts
    cfg = small_config(tmp_path, max_steps=3, save_steps=1, save_total_limit=1)
    real_save = torch.save

    def disk_full_in_checkpoint_2(obj, path, *args, **kwargs):
        if "checkpoint-2.tmp" in str(path) and str(path).endswith("trainer_state.pt"):  # after the model's files
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_in_checkpoint_2)
    with pytest.raises(CheckpointError, match=r"checkpoint-2: process 0: OSError: \[Errno 28\] No space left on device") as error:
        Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8], cfg).train()
    assert f"'latest' is {tmp_path / 'checkpoint-1'}" in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "completions.jsonl", "metrics.jsonl"]  # no .tmp left
    assert resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-1")

    # Resuming from it works, and save_total_limit=1 keeps only the newest complete checkpoint
    # (even over a stale later one from an abandoned attempt).
    monkeypatch.setattr(torch, "save", real_save)
    (tmp_path / "checkpoint-9").mkdir()
    resumed = Trainer(copy.deepcopy(model), processor, [char_count], toy_rows[:8],
                      small_config(tmp_path, max_steps=3, save_steps=1, save_total_limit=1,
                                   resume_from_checkpoint=str(tmp_path / "checkpoint-1")))
    assert [r["step"] for r in resumed.train()] == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "completions.jsonl", "metrics.jsonl"]


def test_a_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    log = JsonlLog(str(path), resume_step=2)
    log.write({"step": 3, "loss": 0.3})
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}]
