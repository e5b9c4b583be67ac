"""Where a run's records go: metrics.jsonl (always), the experiment trackers in `report_to`, the progress line.

Process 0 makes one `MetricsLog` per run; each step's record goes through `write`, which appends it to
metrics.jsonl, sends every number in it to each tracker under the same name at the same step, and
updates the progress line. GRPO's logged completions go through `write_completions`: completions.jsonl,
and a table in W&B. The JSON-lines files are `JsonlLog`s (cut back to the checkpoint on resume); the
progress line is a `Progress`, which `evaluate()` uses too.

Trackers (each an optional extra: `pip install 'pathgrpo[tensorboard]'`, `[wandb]`, `[mlflow]`):
  tensorboard  event files in <output_dir>/tensorboard (`tensorboard --logdir <output_dir>`)
  wandb        a W&B run; WANDB_PROJECT (default "pathgrpo"), WANDB_ENTITY, WANDB_MODE (offline...),
               WANDB_NAME (default: the output_dir's name), WANDB_DIR (default: output_dir) are read
  mlflow       an MLflow run; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (default "pathgrpo") or
               MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID (log into an existing run) are read
Each records the run's config once. A resumed run continues the same tracker runs (their ids are kept in
<output_dir>/trackers.json; TensorBoard drops the events past the checkpoint). A tracker asked for but
not installed is an error when the trainer starts; one that fails during the run (a server gone) is
reported once and disabled, and training goes on (metrics.jsonl keeps every record).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import numbers
import os
import sys
import time

import numpy as np
import torch

# tracker -> the package it needs (the pip extra has the tracker's name)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_RUN_IDS = "trackers.json"


def check_report_to(report_to) -> list[str]:
    """`report_to` as a list of tracker names (one name may be given as a string); unknown names are errors."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
    return names


def require_trackers(report_to) -> list[str]:
    """`check_report_to`, and every tracker in it installed, else an ImportError naming the extra to install.
    The configs call it, so a run asking for a missing tracker stops before any model is loaded."""
    names = check_report_to(report_to)
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ImportError(f"report_to includes {name!r} but the {TRACKERS[name]} package is not installed: "
                              f"pip install 'pathgrpo[{name}]' (or pip install {TRACKERS[name]})")
    return names


def metric_values(record: dict) -> dict[str, float]:
    """The numbers of a record, by name (the step and values that are None or not numbers left out)."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real)}


class JsonlLog:
    """Append-only JSON-lines file; on resume, lines of steps after the checkpoint are dropped."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line.rstrip("\n") + "\n" for line in f
                        if (record := _parsed(line)) and record.get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_to_builtin) + "\n")


def _parsed(line: str) -> dict | None:
    """A JSON line, or None for a blank one or the cut last line a killed process leaves."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def _to_builtin(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    return str(value)


class Progress:
    """A one-line progress bar on stderr: step, a few metrics, seconds per step and ETA."""

    def __init__(self, total: int, start: int = 0, label: str = "train"):
        self.total, self.start, self.label = total, start, label
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, **values) -> None:
        done = step - self.start
        rate = (time.time() - self.t0) / max(1, done)
        eta = rate * (self.total - step)
        shown = " ".join(f"{k} {v:.0f}" if abs(v) >= 100 else f"{k} {v:.3f}" for k, v in values.items())
        line = f"[{self.label}] step {step}/{self.total} {shown} | {rate:.2f} s/step | ETA {eta / 60:.1f} min"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if step == self.total else ""))
        elif step == self.total or done == 1 or step % max(1, self.total // 20) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class MetricsLog:
    """metrics.jsonl, the trackers in `config.report_to` and the progress line, for one run (process 0 only).

    `shown`: progress-line label -> record key; a key missing from a record shows its last known value
    (the eval accuracy between evaluations). `completions`: also keep completions.jsonl (GRPO).
    """

    def __init__(self, config, resume_step: int | None, label: str, shown: dict[str, str], completions: bool = False):
        output_dir = config.output_dir
        self.metrics = JsonlLog(os.path.join(output_dir, "metrics.jsonl"), resume_step)
        self.completions = JsonlLog(os.path.join(output_dir, "completions.jsonl"), resume_step) if completions else None
        self.progress = Progress(config.max_steps, resume_step or 0, label)
        self.shown, self.last_shown = shown, {}
        self.failures: dict[str, dict] = {}  # tracker -> {"step", "error", "records_lost"}
        run_ids = _read_run_ids(output_dir) if resume_step is not None else {}
        settings = _plain(dataclasses.asdict(config))
        self.trackers = [_OPEN[name](output_dir, settings, resume_step, run_ids.get(name))
                         for name in check_report_to(config.report_to)]
        _write_run_ids(output_dir, {t.name: t.run_id for t in self.trackers if t.run_id})
        self.step = resume_step or 0
        atexit.register(self.close, True)  # a run that never reached close() (an exception) ends as failed

    def write(self, record: dict) -> None:
        self.step = record["step"]
        self.metrics.write(record)
        values = metric_values(record)
        self._send("log", values, self.step)
        self.last_shown.update({label: values[key] for label, key in self.shown.items() if key in values})
        self.progress.update(self.step, **self.last_shown)

    def write_completions(self, step: int, rows: list[dict]) -> None:
        """Logged completions: one JSON line each, and (W&B) rows added to the run's completions table."""
        for row in rows:
            self.completions.write({"step": step, **row})
        if rows:
            self._send("log_completions", rows, step)

    def close(self, failed: bool = False) -> None:
        """Finish the tracker runs (`failed`: mark them failed) and report any tracker that was disabled."""
        atexit.unregister(self.close)
        for tracker in list(self.trackers):
            self._call(tracker, "close", failed)
        for name, failure in self.failures.items():
            _say(f"{name} was disabled at step {failure['step']} ({failure['error']}); {failure['records_lost']} "
                 f"record(s) did not reach it; metrics.jsonl has them all")
        self.trackers = []

    def _send(self, method: str, *args) -> None:
        for failure in self.failures.values():
            failure["records_lost"] += method == "log"
        for tracker in list(self.trackers):
            self._call(tracker, method, *args)

    def _call(self, tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as error:  # any tracker error: training must go on
            self.trackers.remove(tracker)
            self.failures[tracker.name] = {"step": self.step, "error": f"{type(error).__name__}: {error}",
                                           "records_lost": int(method == "log")}
            _say(f"{tracker.name} failed at step {self.step} ({type(error).__name__}: {error}); it is disabled for the "
                 f"rest of the run, training goes on and metrics.jsonl keeps every record")


def _say(text: str) -> None:
    print(f"[grpo] {text}", file=sys.stderr, flush=True)


def _plain(value):
    """A config as JSON-friendly values (tuples -> lists), for the trackers' config records."""
    return json.loads(json.dumps(value, default=str))


def _read_run_ids(output_dir: str) -> dict:
    path = os.path.join(output_dir, _RUN_IDS)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_run_ids(output_dir: str, run_ids: dict) -> None:
    path = os.path.join(output_dir, _RUN_IDS)
    if run_ids:
        with open(path, "w") as f:
            json.dump(run_ids, f)
    elif os.path.exists(path):
        os.remove(path)


# ---------------------------------------------------------------- trackers: log(values, step), close(failed)


class TensorBoardTracker:
    """Scalars in <output_dir>/tensorboard; the config as a text summary at the run's start."""

    name = "tensorboard"

    def __init__(self, output_dir: str, config: dict, resume_step: int | None, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = None
        # purge_step: events of an earlier run at or after this step are dropped when read (a resumed run
        # continues its curve from the checkpoint; a fresh run replaces an overwritten one).
        start = 0 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start)
        if resume_step is None:
            self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_completions(self, rows: list[dict], step: int) -> None:
        pass  # TensorBoard has no tables; completions.jsonl holds them

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run: the metrics as its history, the config as its config, the completions as a table."""

    name = "wandb"

    def __init__(self, output_dir: str, config: dict, resume_step: int | None, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "pathgrpo",
            name=os.environ.get("WANDB_NAME") or os.path.basename(os.path.abspath(output_dir)),
            dir=os.environ.get("WANDB_DIR") or output_dir,
            id=os.environ.get("WANDB_RUN_ID") or run_id,
            resume="allow" if run_id or os.environ.get("WANDB_RUN_ID") else None,
            config=config,
            reinit="create_new",
        )
        self.run_id = self.run.id
        self.table = None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_completions(self, rows: list[dict], step: int) -> None:
        flat = [_flat_completion(step, row) for row in rows]
        if self.table is None:
            # INCREMENTAL: each step adds its rows to one table instead of logging a new table per step.
            self.table = self.wandb.Table(columns=list(flat[0]), log_mode="INCREMENTAL")
        for row in flat:
            self.table.add_data(*(row.get(column) for column in self.table.columns))
        self.run.log({"completions": self.table}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _flat_completion(step: int, row: dict) -> dict:
    """A completions.jsonl row as a table row: step, id, completion, reward, rewards/<name>..., advantage."""
    flat = {"step": step}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


class MlflowTracker:
    """An MLflow run: the metrics (by step) and the config as its params."""

    name = "mlflow"
    _BATCH = 100  # MLflow takes at most 100 params per call
    _PARAM_CHARS = 6000  # and param values of at most 6000 characters

    def __init__(self, output_dir: str, config: dict, resume_step: int | None, run_id: str | None):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient()  # MLFLOW_TRACKING_URI
        self.run_id = os.environ.get("MLFLOW_RUN_ID") or run_id
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if not experiment_id:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pathgrpo"
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=os.path.basename(os.path.abspath(output_dir)))
        self.run_id = run.info.run_id
        params = [Param(key, _param_text(value)[: self._PARAM_CHARS]) for key, value in config.items()]
        for start in range(0, len(params), self._BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + self._BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(key, value, now, step) for key, value in values.items()])

    def log_completions(self, rows: list[dict], step: int) -> None:
        pass  # completions.jsonl holds them

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _param_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


_OPEN = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
