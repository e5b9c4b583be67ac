"""Runs that survive the cluster: stop signals honoured at a step boundary, non-finite updates skipped.

Both trainers wrap their loop in one `RunGuard` (docs/long-runs.md):

  stop signals   SIGTERM / SIGINT / SIGUSR1 (`stop_signals`) only set a flag. At the end of the step
                 every process learns whether any of them got one (one all-reduce), so all stop after
                 the same step: the checkpoint is written and `train()` raises `Preempted`, a
                 SystemExit with status EXIT_PREEMPTED. A second signal sets the flag again; it never
                 interrupts the save.
  bad updates    `Optimization.step` drops an update whose loss or gradient norm is not finite
                 (weights, optimizer state and LR schedule untouched). The guard counts the step in
                 `skipped_steps`, logs the quantity and the step's row ids, and after
                 `max_consecutive_bad_steps` such steps in a row writes a checkpoint (its weights are
                 the last good ones) and raises `NonFiniteUpdateError`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading

from .distributed import all_gather_objects, any_rank, is_main_process

# What a script exits with after a stop signal (sysexits.h EX_TEMPFAIL: "try again later"): a job
# script or scheduler can tell it from success (0), a crash (1) and a kill (128 + signal number).
EXIT_PREEMPTED = 75
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(SystemExit):
    """Raised by `train()` after a stop signal, once the step is finished and its checkpoint written.

    A SystemExit: a script that does not catch it exits with EXIT_PREEMPTED (no traceback), and
    `except Exception` does not swallow it. A library user may catch it by name.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(EXIT_PREEMPTED)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    def __str__(self) -> str:
        return (f"stopped by {self.signal_name} after step {self.step}; checkpoint {self.checkpoint}; "
                f"resume with resume_from_checkpoint='latest' (exit status {EXIT_PREEMPTED})")


class NonFiniteUpdateError(RuntimeError):
    """`max_consecutive_bad_steps` steps in a row had a non-finite loss or gradient norm."""


def check_guard_settings(cfg) -> None:
    """A config's `stop_signals` and `max_consecutive_bad_steps` (both trainers' __post_init__)."""
    check_stop_signals(cfg.stop_signals)
    if cfg.max_consecutive_bad_steps < 1:
        raise ValueError(f"max_consecutive_bad_steps must be >= 1, got {cfg.max_consecutive_bad_steps}")


def check_stop_signals(names) -> list[signal.Signals]:
    """The signals named in a config's `stop_signals` (e.g. "SIGTERM"); an unknown name is an error."""
    found = []
    for name in names:
        if not isinstance(name, str) or not isinstance(getattr(signal, name, None), signal.Signals):
            raise ValueError(f"stop_signals: {name!r} is not a signal name (e.g. {', '.join(STOP_SIGNALS)})")
        if name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"stop_signals: {name} cannot be caught")
        found.append(getattr(signal, name))
    return found


class RunGuard:
    """Stop signals and skipped updates of one `train()` call; a context manager that installs the
    signal handlers for the loop and puts the previous ones back after it."""

    def __init__(self, cfg, device, label: str):
        self.signals = check_stop_signals(cfg.stop_signals)
        self.max_bad = cfg.max_consecutive_bad_steps
        self.device, self.label = device, label
        self.received: str | None = None  # the first stop signal this process got
        self.stop_signal: str | None = None  # the one all processes agreed to stop for
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.bad_steps: list[int] = []  # the current run of consecutive bad steps
        self._skipped_updates = 0  # Optimization.skipped_updates at the end of the previous step
        self._previous = {}

    # ---------------------------------------------------------------- signals
    def __enter__(self):
        self.received = self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            self._say("train() runs outside the main thread: stop signals keep their usual effect")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the handler runs between two bytecodes of whatever the process is doing
        # (a checkpoint write, a collective), which must not be cut.
        if self.received is None:
            self.received = signal.Signals(signum).name

    # ---------------------------------------------------------------- checkpointed state
    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run counts on as the uninterrupted run does."""
        return {"skipped_steps": self.skipped_steps, "bad_steps": list(self.bad_steps)}

    def load_state(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_steps = list(state.get("bad_steps", []))
        self.consecutive_bad = len(self.bad_steps)

    # ---------------------------------------------------------------- step boundary
    def end_step(self, step: int, opt, quantities: dict, rows: list[dict], row_indices: list[int]) -> dict:
        """Count the step's skipped update (if any) and agree over processes whether to stop.

        Collective: every process calls it once per step. `quantities`: the step's loss and gradient
        norm; `rows`, `row_indices`: this process's rows of the step and their dataset indices (a row
        is named by its `id` field, else its index). Returns the fields for the step's metrics record.
        """
        skipped = opt.skipped_updates > self._skipped_updates  # agreed already: DeepSpeed reduces its overflow flag
        self._skipped_updates = opt.skipped_updates
        fields = {}
        if skipped:
            self.skipped_steps += 1
            self.bad_steps.append(step)
            ids = [row.get("id", index) for row, index in zip(rows, row_indices)]
            rows = [row_id for ids in all_gather_objects(ids) for row_id in ids]
            reason = ", ".join(f"{key}={value}" for key, value in quantities.items() if not math.isfinite(value)) \
                or "gradient not finite"
            fields = {"skipped_update": reason, "skipped_rows": rows}
            self._say(f"step {step}: update skipped ({reason}; weights and optimizer state unchanged); rows {rows}")
        else:
            self.bad_steps = []
        self.consecutive_bad = len(self.bad_steps)
        fields["skipped_steps"] = self.skipped_steps
        if any_rank(self.received is not None, self.device):
            self.stop_signal = next(name for name in all_gather_objects(self.received) if name)
            fields["stopped_by"] = self.stop_signal
        return fields

    def finish_step(self, step: int, checkpoint: str | None, save) -> None:
        """After the step's own save (`checkpoint`: its path, None if none was due): stop the run if a
        signal asked for it or too many bad steps came in a row, writing the checkpoint first."""
        if self.stop_signal is None and self.consecutive_bad < self.max_bad:
            return
        checkpoint = checkpoint or save(step)
        if self.stop_signal is not None:
            error = Preempted(self.stop_signal, step, checkpoint)
            self._say(str(error))
            raise error
        raise NonFiniteUpdateError(
            f"{self.consecutive_bad} steps in a row ({', '.join(map(str, self.bad_steps))}) had a non-finite loss or "
            f"gradient norm (max_consecutive_bad_steps={self.max_bad}); their updates were skipped, so {checkpoint} "
            f"holds the weights and optimizer state of the last good update (resuming from it continues after these "
            f"steps' rows). metrics.jsonl names each step's rows and quantity (skipped_update, skipped_rows); look "
            f"for rows or rewards that break the loss, or lower the learning rate")

    def _say(self, message: str) -> None:
        if is_main_process():
            print(f"\n[{self.label}] {message}", file=sys.stderr, flush=True)

