"""Scale-out on DeepSpeed, on this CPU: 2 processes (torchrun, gloo, DS_ACCELERATOR=cpu).

What a user relies on: 2 processes x P prompts make exactly the update 1 process x 2P prompts
makes (loss, grad norm, every parameter's gradient, weights, logged metrics) under ZeRO-2 and
ZeRO-3; ZeRO-3 generation does not hang when processes finish decoding at different steps; ZeRO-3
refuses (rather than hangs on) prompts with images on one process and none on another; a ZeRO-3 run
resumes exactly; a SIGTERM reaching one process stops every process after the same step with a
checkpoint and EXIT_PREEMPTED, and the resumed run is the uninterrupted one; a NaN loss on one
process makes every process skip the update; dynamic sampling and the 80/20 entropy threshold
decide over the whole step.
Each test launches tests/distributed_worker.py; see its docstring for the scenarios. The tests that
launch 2 processes with torchrun are marked `distributed` (`pytest -m 'not distributed'` skips them).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from grpo.resilience import EXIT_PREEMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
VOLATILE = {"step_time", "tokens_per_sec"}

pytest.importorskip("deepspeed")


def launch(scenarios: str, zero: str, out_dir, processes: int = 2, timeout: int = 300, family: str = "qwen2_5_vl",
           status: int = 0) -> str:
    # PYTHONFAULTHANDLER: a worker killed by a signal prints its Python stack into the failure message.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
           "TINY_FAMILY": family}
    if processes == 1:
        command = [sys.executable, WORKER, scenarios, zero, str(out_dir)]
        env.pop("WORLD_SIZE", None)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29500 + os.getpid() % 1000), WORKER, scenarios, zero, str(out_dir)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{scenarios} under {zero} did not finish in {timeout} s (a hang?):\n{(error.stdout or '')[-3000:]}")
    assert done.returncode == status, f"{scenarios} under {zero} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stderr


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    launch("update,sft,variants", "none", out, processes=1)
    return out


def assert_same_update(one_dir, two_dir, tag: str) -> None:
    """Every parameter's gradient, then its updated value, equal between the two runs. The gradient
    is checked itself because with lr=1e-2 Adam the updated weights mostly reflect its signs."""
    grads_one, grads_two = (torch.load(d / f"gradients_{tag}.pt") for d in (one_dir, two_dir))
    assert grads_two.keys() == grads_one.keys() and len(grads_one) > 10
    scale = max(float(g.abs().max()) for g in grads_one.values())
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_two[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=f"{tag} {name}")
    before, after = (torch.load(d / f"weights_{tag}.pt") for d in (one_dir, two_dir))
    assert after.keys() == before.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-3, atol=1e-4, msg=f"{tag} {name}")


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_update_like_one_process_with_the_whole_batch(zero, single_process, tmp_path):
    scenarios = "update,sft,uneven,images" if zero == "zero3" else "update,sft,stats"
    launch(scenarios, zero, tmp_path)
    one = json.loads((single_process / "update.json").read_text())
    two = json.loads((tmp_path / "update.json").read_text())
    for loss_type in ("grpo", "dapo"):  # dapo with scale_rewards="batch": both need global reductions
        a, b = one[loss_type], two[loss_type]
        assert b["stats"]["loss"] == pytest.approx(a["stats"]["loss"], rel=1e-4, abs=1e-6), loss_type
        assert b["stats"]["grad_norm"] == pytest.approx(a["stats"]["grad_norm"], rel=1e-4), loss_type
        assert a["stats"]["grad_norm"] > 0.1  # a real update, not a vacuous match
        # The average of the processes' gradients is the whole batch's gradient.
        assert_same_update(single_process, tmp_path, loss_type)
        # Every logged number of the step is the whole batch's, not one process's.
        for key, value in a["metrics"].items():
            if key not in VOLATILE:
                assert b["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (loss_type, key)
    # SFT: the token mean over the step's targets, whichever process holds them.
    one, two = (json.loads((d / "sft.json").read_text()) for d in (single_process, tmp_path))
    assert two["tokens"] == one["tokens"] and two["truncated_frac"] == one["truncated_frac"] > 0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert_same_update(single_process, tmp_path, "sft")
    if zero == "zero3":
        # One process finished after a token, the other decoded all 12: both came back.
        uneven = json.loads((tmp_path / "uneven.json").read_text())["per_rank"]
        assert [r["lengths"] for r in uneven] == [[1, 1], [12, 12]] and all(r["ref_logprobs_finite"] for r in uneven)
        refusals = json.loads((tmp_path / "images.json").read_text())["per_rank"]
        assert all(message and "ZeRO-3" in message and "2 of the 4 prompts" in message for message in refusals), refusals
    else:
        # A judge's counters from both processes: requests 1 + 2, latency the mean, a mean only rank 0 has.
        merged = json.loads((tmp_path / "stats.json").read_text())
        assert merged == {"counter/requests": 3, "counter/latency_p50": pytest.approx(0.15), "counter/integrity_mean": 0.5}


@pytest.mark.distributed
def test_dynamic_sampling_and_the_entropy_threshold_decide_on_two_processes_as_on_one(single_process, tmp_path):
    """DAPO's keep/drop rule and the 80/20 threshold are taken over the whole step: 2 processes
    train the same groups in the same order with the same counters, and mask the same tokens."""
    launch("variants", "zero2", tmp_path)
    one, two = (json.loads((d / "variants.json").read_text()) for d in (single_process, tmp_path))
    assert two["dynamic"] == one["dynamic"]
    assert any(c["dynamic_sampling/rounds"] > 1 for c in one["dynamic"]["counters"])  # a refill happened
    assert all(c["dynamic_sampling/informative_groups"] == 4 for c in one["dynamic"]["counters"])
    mask = torch.tensor(one["entropy"]["token_mask"])
    assert two["entropy"]["token_mask"] == one["entropy"]["token_mask"] and 0 < mask.sum() < mask.numel() / 2
    for key in ("loss", "grad_norm", "kl"):
        assert two["entropy"]["stats"][key] == pytest.approx(one["entropy"]["stats"][key], rel=1e-4, abs=1e-6), key


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_lora_two_processes_update_the_adapter_like_one_process_with_the_whole_batch(zero, tmp_path):
    """LoRA under DeepSpeed: the same loss, adapter gradients and updated adapter as one process with
    the whole batch; the reference (adapters off) gives the same log-probs; the checkpoint's adapter
    (gathered from the shards under ZeRO-3) is the updated adapter."""
    pytest.importorskip("peft")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    launch("lora", "none", tmp_path / "one", processes=1)
    launch("lora", zero, tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "lora.json").read_text()) for d in ("one", "two"))
    assert two["stats"]["loss"] == pytest.approx(one["stats"]["loss"], rel=1e-4, abs=1e-6)
    assert two["stats"]["grad_norm"] == pytest.approx(one["stats"]["grad_norm"], rel=1e-4) and one["stats"]["grad_norm"] > 0.1
    for a, b in zip(one["ref_logprobs"], two["ref_logprobs"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert_same_update(tmp_path / "one", tmp_path / "two", "lora")
    weights = torch.load(tmp_path / "two" / "weights_lora.pt")
    assert weights and all("lora_" in name for name in weights)
    saved = torch.load(tmp_path / "two" / "lora_checkpoint.pt")  # PEFT drops the adapter name from the keys
    assert len(saved) == len(weights)
    for name, value in weights.items():
        torch.testing.assert_close(saved[name.replace(".default", "")], value)


@pytest.mark.distributed
def test_zero3_on_qwen3_vl_updates_like_one_process_and_decodes_unevenly(tmp_path):
    """Another family under ZeRO-3: Qwen3-VL's cached image features carry its DeepStack features
    through the sharded model; 2 processes x 2 prompts make the 1 x 4 update."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    launch("update", "none", tmp_path / "one", processes=1, family="qwen3_vl")
    launch("update,uneven", "zero3", tmp_path / "two", family="qwen3_vl")
    one, two = (json.loads((tmp_path / d / "update.json").read_text()) for d in ("one", "two"))
    for loss_type in ("grpo", "dapo"):
        a, b = one[loss_type]["stats"], two[loss_type]["stats"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6) and a["grad_norm"] > 0.1
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert_same_update(tmp_path / "one", tmp_path / "two", loss_type)
    uneven = json.loads((tmp_path / "two" / "uneven.json").read_text())["per_rank"]
    assert [r["lengths"] for r in uneven] == [[1, 1], [12, 12]] and all(r["ref_logprobs_finite"] for r in uneven)


@pytest.mark.distributed
def test_zero3_run_resumes_exactly_and_saves_plain_transformers_checkpoints(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    launch("resume", "zero3", tmp_path, timeout=400)

    def metrics(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]

    for full, resumed in (("full", "resumed"), ("sft_full", "sft_resumed")):
        expected, got = metrics(full), metrics(resumed)
        assert [m["step"] for m in expected] == [1, 2, 3] and [m["step"] for m in got] == [2, 3]
        assert got == expected[1:], full
    # The consolidated checkpoint loads with plain transformers and is what the resumed run ended with.
    final = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "full" / "checkpoint-3").state_dict()
    resumed = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "checkpoint-3").state_dict()
    first = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "full" / "checkpoint-1").state_dict()
    assert any(not torch.equal(final[k], first[k]) for k in final)  # the weights did train
    for name in final:
        assert torch.equal(final[name], resumed[name]), name


@pytest.mark.distributed
def test_zero3_lora_run_resumes_exactly_from_an_adapter_checkpoint(tmp_path):
    """GRPO and SFT with LoRA under ZeRO-3: the checkpoints hold the adapter (gathered from the shards)
    and the optimizer/RNG state; the run resumed from checkpoint-1 logs what the uninterrupted run
    logged and ends with the same adapter."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    launch("lora_resume", "zero3", tmp_path, timeout=400)

    def metrics(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]

    for full, resumed in (("lora_full", "lora_resumed"), ("lora_sft_full", "lora_sft_resumed")):
        expected, got = metrics(full), metrics(resumed)
        assert [m["step"] for m in expected] == [1, 2, 3] and [m["step"] for m in got] == [2, 3]
        assert got == expected[1:], full
        assert not (tmp_path / full / "checkpoint-3" / "model.safetensors").exists()  # the adapter only
        final, resumed_final, first = (load_file(tmp_path / d / f"checkpoint-{k}" / "adapter_model.safetensors")
                                       for d, k in ((full, 3), (resumed, 3), (full, 1)))
        assert final.keys() == resumed_final.keys() and final and all("lora_" in name for name in final)
        assert any(not torch.equal(final[k], first[k]) for k in final), full  # the adapter did train
        for name in final:
            assert torch.equal(final[name], resumed_final[name]), (full, name)


def assert_stopped_run_resumed_like_the_full_run(out_dir, processes: int) -> None:
    """preempted_<rank>.json, then stopped/ (stopped after step 2, resumed to 4) against full/."""
    from safetensors.torch import load_file

    for rank in range(processes):
        stop = json.loads((out_dir / f"preempted_{rank}.json").read_text())
        assert stop == {"code": EXIT_PREEMPTED, "step": 2, "checkpoint": str(out_dir / "stopped" / "checkpoint-2"),
                        "signal": "SIGTERM"}, rank

    def metrics(name):
        return [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]

    full, stopped = metrics("full"), metrics("stopped")
    assert [m["step"] for m in stopped] == [1, 2, 3, 4]
    assert [m.get("stopped_by") for m in stopped] == [None, "SIGTERM", None, None]
    for a, b in zip(full, stopped):
        assert {k: v for k, v in b.items() if k not in VOLATILE | {"stopped_by"}} == \
            {k: v for k, v in a.items() if k not in VOLATILE}, a["step"]
    weights = [load_file(out_dir / name / "checkpoint-4" / "model.safetensors") for name in ("full", "stopped")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_sigterm_stops_a_run_with_a_checkpoint_and_exit_status_75_and_it_resumes_exactly(tmp_path):
    """A plain process (no launcher) exits with EXIT_PREEMPTED itself."""
    launch("preempt", "none", tmp_path, processes=1, status=EXIT_PREEMPTED)
    launch("resume_preempted", "none", tmp_path, processes=1)
    assert_stopped_run_resumed_like_the_full_run(tmp_path, processes=1)


@pytest.mark.distributed
def test_sigterm_to_one_process_stops_both_after_the_same_step_and_nan_on_one_skips_on_both(tmp_path):
    # torchrun reports the first worker's 75 and exits 1 (it stops the other, which may be leaving too).
    errors = launch("preempt", "zero2", tmp_path, status=1)
    assert f"exitcode  : {EXIT_PREEMPTED}" in errors
    launch("resume_preempted,nonfinite", "zero2", tmp_path)
    assert_stopped_run_resumed_like_the_full_run(tmp_path, processes=2)
    # Process 0's loss was NaN in step 2: neither process moved its weights, its optimizer
    # partition or the LR schedule in that step; steps 1 and 3 moved all three.
    for rank in json.loads((tmp_path / "nonfinite.json").read_text())["per_rank"]:
        assert rank["skipped_updates"] == 1
        assert [set(k for k, v in step.items() if v) for step in rank["moved"]] == [{"weights", "adam", "lr"}, set(),
                                                                                      {"weights", "adam", "lr"}]
    records = [json.loads(line) for line in (tmp_path / "nonfinite" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert "loss=nan" in records[1]["skipped_update"] and len(records[1]["skipped_rows"]) == 4
