"""Experiment trackers and run plots: every metrics.jsonl number reaches TensorBoard, W&B and MLflow under
its name at its step (read back with each tool's own reader), the config is recorded, a failing tracker
never stops training, and grpo.plot draws every panel."""

import copy
import glob
import json
import os
import struct
import sys

import pytest

from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer
from grpo import tracking
from grpo.tracking import metric_values
from rewards import format_reward


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def grpo_run(tiny_parts, toy_rows, output_dir, **overrides):
    model, processor = tiny_parts
    cfg = GRPOConfig(**{**dict(output_dir=str(output_dir), group_size=2, prompts_per_step=2, completions_per_micro_batch=4,
                               max_completion_length=6, learning_rate=1e-3, max_steps=3, save_steps=0, eval_steps=3,
                               eval_batch_size=2, log_completions=2), **overrides})
    trainer = Trainer(copy.deepcopy(model), processor, [format_reward, length_reward], toy_rows[:8], cfg,
                      eval_dataset=toy_rows[8:10])
    return trainer.train()


@pytest.fixture(scope="module")
def tracked_run(tiny_parts, toy_rows, tmp_path_factory):
    """One 3-step GRPO run reporting to all three trackers (W&B offline, MLflow on a local file store)."""
    root = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_PROJECT": "tests",
           "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_EXPERIMENT_NAME": "tracking-test"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for key in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(key, raising=False)
        history = grpo_run(tiny_parts, toy_rows, root / "run", report_to=["tensorboard", "wandb", "mlflow"])
    metrics = read_jsonl(root / "run" / "metrics.jsonl")
    assert metrics == json.loads(json.dumps(history)) and [r["step"] for r in metrics] == [1, 2, 3]
    assert "eval/format_reward" in metrics[-1] and "eval/accuracy" not in metrics[-1]  # format measures no correctness
    return root, metrics


def expected_series(metrics):
    """metric name -> [(step, value)] as every tracker must have them."""
    series = {}
    for record in metrics:
        for key, value in metric_values(record).items():
            series.setdefault(key, []).append((record["step"], value))
    return series


def test_tensorboard_holds_every_metric_at_its_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, metrics = tracked_run
    events = EventAccumulator(str(root / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = expected_series(metrics)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), key  # stored as float32
    assert "config/text_summary" in events.Tags()["tensors"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"group_size": 2' in config_text


def read_wandb_records(path):
    """The protobuf records of a .wandb file (W&B's append-only log: a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: CRC, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_history_config_and_completions_table(tracked_run):
    root, metrics = tracked_run
    (run_dir,) = glob.glob(str(root / "run" / "wandb" / "offline-run-*"))
    records = read_wandb_records(glob.glob(os.path.join(run_dir, "*.wandb"))[0])
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
    assert sorted(history) == [1, 2, 3]
    for record in metrics:
        logged = history[record["step"]]
        for key, value in metric_values(record).items():
            assert logged[key] == pytest.approx(value, rel=1e-12), key
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["group_size"] == 2 and config["report_to"] == ["tensorboard", "wandb", "mlflow"]
    # The completions table, one increment per step: the rows of completions.jsonl.
    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "files", "media", "table", "completions_*.table.json"))):
        with open(path) as f:
            table = json.load(f)
        rows += [dict(zip(table["columns"], row)) for row in table["data"]]
    logged = read_jsonl(root / "run" / "completions.jsonl")
    assert len(rows) == len(logged) == 3 * 2
    for row, sample in zip(sorted(rows, key=lambda r: r["step"]), logged):
        assert {k: row[k] for k in ("step", "id", "completion")} == {k: sample[k] for k in ("step", "id", "completion")}
        assert row["reward"] == pytest.approx(sample["reward"]) and row["advantage"] == pytest.approx(sample["advantage"])
        assert row["rewards/length_reward"] == pytest.approx(sample["rewards"]["length_reward"])
        assert row["rewards/format_reward"] == sample["rewards"]["format_reward"]


def test_mlflow_run_holds_metrics_and_params(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, metrics = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file:{root / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for key, points in expected_series(metrics).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-12), key
    assert run.data.params["group_size"] == "2" and run.data.params["adam_betas"] == "[0.9, 0.99]"
    with open(root / "run" / "trackers.json") as f:
        assert json.load(f)["mlflow"] == run.info.run_id  # a resumed run continues this one


def test_sft_reports_its_metrics_to_tensorboard(tiny_parts, toy_rows, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data import sft_target

    model, processor = tiny_parts
    rows = [{**row, "completion": sft_target(row)} for row in toy_rows[:4]]
    cfg = SFTConfig(output_dir=str(tmp_path), batch_size=2, micro_batch_size=2, max_completion_length=16, max_steps=2,
                    save_steps=0, report_to="tensorboard")
    SFTTrainer(copy.deepcopy(model), processor, rows, cfg).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key, points in expected_series(read_jsonl(tmp_path / "metrics.jsonl")).items():
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == points, key


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, monkeypatch):
    """Resumed from step 1, the TensorBoard curve is the resumed run's (the old steps 2-3 dropped) and the
    metrics reach the same MLflow run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, report_to=["tensorboard", "mlflow"])
    first = tracking.MetricsLog(cfg, None, "sft", {"loss": "loss"})
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    first.close(failed=True)  # the run that crashed after step 3, its last checkpoint at step 1
    again = tracking.MetricsLog(cfg, 1, "sft", {"loss": "loss"})
    for step in (2, 3):
        again.write({"step": step, "loss": 10.0 * step})
    again.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    assert [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1.0, 20.0, 30.0]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("pathgrpo").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")][-2:] == [(2, 20.0), (3, 30.0)]


class FailingTracker:
    """Fails at its second record, as a tracker whose server went away."""

    name = "tensorboard"
    calls = []

    def __init__(self, output_dir, config, resume_step, run_id):
        self.run_id = None

    def log(self, values, step):
        FailingTracker.calls.append(step)
        if step == 2:
            raise ConnectionError("tracking server gone")

    def log_completions(self, rows, step):
        pass

    def close(self, failed):
        FailingTracker.calls.append("closed")


def test_a_failing_tracker_is_disabled_once_and_training_goes_on(tiny_parts, toy_rows, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(tracking._OPEN, "tensorboard", FailingTracker)
    FailingTracker.calls = []
    history = grpo_run(tiny_parts, toy_rows, tmp_path, report_to=["tensorboard"], eval_steps=0)
    assert [r["step"] for r in history] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert FailingTracker.calls == [1, 2]  # nothing after the failure, not even close
    err = capfd.readouterr().err
    assert err.count("tensorboard failed at step 2 (ConnectionError: tracking server gone)") == 1
    assert "tensorboard was disabled at step 2" in err and "2 record(s) did not reach it" in err


def test_a_tracker_that_is_not_installed_is_an_error_naming_its_extra(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ImportError, match=r"pip install 'pathgrpo\[wandb\]'"):
        GRPOConfig(report_to=["wandb"])
    with pytest.raises(ValueError, match="run.yaml.*unknown tracker 'tensorbord'; valid: tensorboard, wandb, mlflow"):
        SFTConfig.from_dict({"report_to": ["tensorbord"]}, source="run.yaml [sft]")


# ---------------------------------------------------------------- grpo.plot


def write_run(path, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def grpo_records(steps, shift):
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 0.0, "reward": 0.5 + shift * step, "kl": 0.01 * step, "clip_ratio": 0.0,
                  "rewards/format_reward/mean": 1.0, "rewards/accuracy_reward/mean": 0.1 * step,
                  "completion_length/mean": 40.0 + step, "step_time": 1.5, "tokens_per_sec": 100.0}
        if step % 2 == 0:
            record["eval/accuracy"] = 0.2 * step
        records.append(record)
    return records


def test_plot_draws_every_panel_for_two_runs(tmp_path):
    from grpo import plot

    write_run(tmp_path / "beta", grpo_records(4, 0.01))
    write_run(tmp_path / "r1", grpo_records(4, 0.02))
    output = tmp_path / "curves.png"
    assert plot.main([str(tmp_path / "beta"), f"judge={tmp_path / 'r1'}", "-o", str(output)]) == str(output)
    with open(output, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    titles = ["reward (train rollouts)", "reward: format_reward", "reward: accuracy_reward", "accuracy",
              "KL to reference (k3)", "completion length (mean tokens)", "clip ratio", "step time (s)"]
    rows = -(-len(titles) // plot.COLUMNS)
    assert (width, height) == (plot.COLUMNS * plot.PANEL_SIZE[0] * plot.DPI, rows * plot.PANEL_SIZE[1] * plot.DPI)

    fig = plot.plot_runs([str(tmp_path / "beta"), str(tmp_path / "r1")], str(output))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == titles
    for ax in panels:
        lines = ax.get_lines()
        assert {line.get_label().split()[0] for line in lines} == {"beta", "r1"}, ax.get_title()
        assert all(len(line.get_xdata()) for line in lines), ax.get_title()
    accuracy = {line.get_label(): list(line.get_xdata()) for line in panels[3].get_lines()}
    assert accuracy == {"beta train": [1, 2, 3, 4], "beta eval": [2, 4], "r1 train": [1, 2, 3, 4], "r1 eval": [2, 4]}


def test_plot_draws_sft_runs_beside_grpo_runs(tmp_path):
    from grpo import plot

    write_run(tmp_path / "sft", [{"step": s, "loss": 2.0 / s, "tokens_per_sec": 900.0, "step_time": 0.1} for s in (1, 2, 3)])
    write_run(tmp_path / "grpo", grpo_records(2, 0.01))
    fig = plot.plot_runs([str(tmp_path / "sft"), str(tmp_path / "grpo")], str(tmp_path / "c.png"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[:2] == ["SFT loss (per token)", "SFT tokens/s"] and "reward (train rollouts)" in titles
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.plot_runs([str(tmp_path / "missing")], str(tmp_path / "d.png"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
