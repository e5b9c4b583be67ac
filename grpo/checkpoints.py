"""Checkpoints: atomic saves, resuming, the checkpoint limit, and the output directory that holds them.

A run writes `checkpoint-<step>/` into its output_dir (docs/configuration.md: Outputs; docs/long-runs.md); a save
is atomic (a kill leaves each checkpoint complete or absent), and a resumed run continues exactly:
weights, optimizer, scheduler, fp32 master weights and every process's random-number states.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from . import lora
from .distributed import all_gather_objects, barrier, is_main_process, world


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, permissions, I/O error); earlier ones are intact."""


def save_checkpoint(output_dir: str, step: int, opt, processor, extra: dict, total_limit: int | None) -> str:
    """Write `checkpoint-<step>/` atomically: into a temporary directory, then renamed.

    Holds the model and processor (`save_pretrained`, safetensors, loadable by plain transformers;
    under ZeRO-3 the shards are gathered first; under LoRA the adapter alone, in PEFT's layout),
    `trainer_state.pt` (step, `extra`, and for a plain run the optimizer, scheduler and fp32 master
    weights), one `rng_state_<rank>.pt` per process, and under DeepSpeed the engine's own state in
    `deepspeed/`. A crash mid-save leaves only a `.tmp` directory that resume ignores. Every process
    must call this (the gathers are collective).

    A write that fails (disk full, permissions, I/O error) raises CheckpointError on every process,
    naming the path and the OS error, after removing the temporary directory: every earlier
    checkpoint is intact and "latest" still finds the last complete one. (A failure inside
    DeepSpeed's own save is raised at once by the process that met it, which then exits; the
    launcher stops the others.) `total_limit` removes old checkpoints only once the new one is
    complete, and never the new one.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    rank, _ = world()
    main = is_main_process()
    failure = _FirstFailure()
    if main:
        failure.attempt(_fresh_directory, output_dir, tmp)
    barrier()
    # The collective parts first, on every process, so that none is left waiting on one that failed.
    adapter_only = lora.is_peft_model(opt.model)
    if adapter_only:  # the adapter alone, in PEFT's layout (its shards gathered under ZeRO-3: collective)
        lora.save_adapter(opt.model, tmp, gather_zero3=opt.zero_stage == 3, write=main, attempt=failure.attempt)
    state_dict = None
    if opt.engine is not None and opt.zero_stage == 3 and not adapter_only:
        state_dict = opt.engine._zero3_consolidated_16bit_state_dict()  # collective; the full weights on rank 0
    if opt.engine is not None:
        try:
            # Under LoRA without the frozen base: that is the model the run was started from.
            opt.engine.save_checkpoint(tmp, tag="deepspeed", save_latest=False, exclude_frozen_parameters=adapter_only)
        except OSError as error:  # amid DeepSpeed's own collectives: this process stops here, the launcher stops the rest
            raise _checkpoint_error(final, [_describe(error, rank)]) from error
    if main:
        if not adapter_only:
            failure.attempt(opt.model.save_pretrained, tmp, state_dict=state_dict, safe_serialization=True)
        if processor is not None:
            failure.attempt(processor.save_pretrained, tmp)
        state = {"step": step, **extra}
        if opt.engine is None:
            # With the fp32 master weights (empty without them): the bf16 weights alone have lost their low bits.
            state.update(optimizer=opt.optimizer.state_dict(), scheduler=opt.scheduler.state_dict(),
                         master_weights=opt.master_weights.state_dict())
        failure.attempt(torch.save, state, os.path.join(tmp, "trainer_state.pt"))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    failure.attempt(torch.save, rng, os.path.join(tmp, f"rng_state_{rank}.pt"))
    failure.agree(final, tmp)
    if main:
        failure.attempt(_publish, tmp, final, output_dir, total_limit)
    failure.agree(final, tmp)
    return final


class _FirstFailure:
    """The first OSError this process met while writing its part of a checkpoint (no collective
    call in between): the remaining writes are skipped, and `agree` raises on every process."""

    def __init__(self):
        self.error: OSError | None = None

    def attempt(self, write, *args, **kwargs) -> None:
        if self.error is None:
            try:
                write(*args, **kwargs)
            except OSError as error:
                self.error = error

    def agree(self, final: str, tmp: str) -> None:
        """Collective: raise CheckpointError on every process if any failed (the temporary directory removed)."""
        mine = None if self.error is None else _describe(self.error, world()[0])
        failures = [f for f in all_gather_objects(mine) if f]
        if failures:
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            raise _checkpoint_error(final, failures)


def _describe(error: OSError, rank: int) -> str:
    return f"process {rank}: {type(error).__name__}: {error}"


def _checkpoint_error(final: str, failures: list[str]) -> CheckpointError:
    found = list_checkpoints(os.path.dirname(final))
    latest = f"'latest' is {found[-1]}" if found else "there is no earlier checkpoint"
    return CheckpointError(f"could not write checkpoint {final}: {'; '.join(failures)}. Earlier checkpoints are "
                           f"intact ({latest}); free space or fix the path, then resume with resume_from_checkpoint='latest'")


_LEFTOVER = re.compile(r"^checkpoint-\d+\.(tmp|old|deleted)$")


def _fresh_directory(output_dir: str, tmp: str) -> None:
    """An empty `tmp`, and no leftovers of interrupted saves or removals (resume ignores them anyway)."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    os.makedirs(tmp)


def _publish(tmp: str, final: str, output_dir: str, total_limit: int | None) -> None:
    """Make the written `tmp` the checkpoint `final`, durably, then apply `total_limit`.

    Every rename is atomic, so a kill at any point leaves each checkpoint-N either complete or absent.
    """
    _fsync_tree(tmp)  # the files reach the disk before the name that says they are complete
    if os.path.exists(final):  # the same step saved again (a run resumed from an earlier checkpoint)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    _fsync_directory(output_dir)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if total_limit:
        others = [path for path in list_checkpoints(output_dir) if path != final]
        for old in others[: max(0, len(others) - (total_limit - 1))]:
            os.replace(old, old + ".deleted")  # out of list_checkpoints at once; the files go after
            shutil.rmtree(old + ".deleted", ignore_errors=True)


def _fsync_tree(path: str) -> None:
    """fsync every file under `path` and the directories holding them."""
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_directory(folder)


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_model(path: str) -> str:
    """A hub name, a model or LoRA-adapter directory as is; a training run's output_dir -> its latest checkpoint."""
    if not os.path.isdir(path) or lora.is_adapter_checkpoint(path) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} holds no checkpoint (nor a config.json): run the stage that writes it first")
    return found[-1]


def resolve_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.pt")):
        raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a checkpoint directory")
    return resume_from_checkpoint


def load_checkpoint(path: str, opt) -> dict:
    """Restore weights, optimizer, scheduler, fp32 master weights and this process's RNG states; returns trainer_state.

    A DeepSpeed checkpoint resumes on the same number of processes it was written by.
    """
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    rank, size = world()
    rng_path = os.path.join(path, f"rng_state_{rank}.pt")
    if not os.path.isfile(rng_path):
        raise ValueError(f"checkpoint {path} has no {os.path.basename(rng_path)}: it was written by fewer than {size} processes")
    adapter_only = lora.is_peft_model(opt.model)
    if opt.engine is not None:
        loaded, _ = opt.engine.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                               load_lr_scheduler_states=True, load_module_strict=not adapter_only)
        if loaded is None:
            raise ValueError(f"checkpoint {path} has no DeepSpeed state (deepspeed/); it was written without DeepSpeed")
    else:
        model = opt.model
        if adapter_only:
            lora.load_adapter_weights(model, path)
        else:
            # from_pretrained maps the checkpoint's saved key names back onto the module names.
            saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
            model.load_state_dict(saved.state_dict())
            del saved
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {path} was written by DeepSpeed; resume it with the same deepspeed setting")
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.scheduler.load_state_dict(state["scheduler"])
        opt.master_weights.load_state_dict(state.get("master_weights", {}), path)
    rng = torch.load(rng_path, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return state


def check_output_dir(output_dir: str, resume_from_checkpoint, overwrite: bool) -> None:
    """Refuse to start a fresh run where an earlier run's results are (checkpoints, metrics).

    Resuming keeps what is there (`resume_from_checkpoint="latest"` finding no checkpoint yet
    starts again a run that stopped before its first save); `overwrite` allows replacing it.
    Scripts may call this before they write anything into `output_dir`.
    """
    if resume_from_checkpoint or overwrite:
        return
    metrics = os.path.join(output_dir, "metrics.jsonl")
    found = list_checkpoints(output_dir) + ([metrics] if os.path.isfile(metrics) and os.path.getsize(metrics) else [])
    if found:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(os.path.basename(f) for f in found)}); "
            f"resume it (resume_from_checkpoint='latest'), choose another output_dir, or set overwrite_output_dir=True")


def start_output_dir(output_dir: str, resume_from_checkpoint, overwrite: bool) -> None:
    """Make `output_dir` ready for a run (`check_output_dir`, decided by process 0 and raised on every
    process). A fresh run that may overwrite removes the old checkpoints, so that
    `save_total_limit` and "latest" never pick a stale one."""
    verdict = None
    if is_main_process():
        try:
            check_output_dir(output_dir, resume_from_checkpoint, overwrite)
        except ValueError as error:
            verdict = str(error)
    verdict = all_gather_objects(verdict)[0]
    if verdict:
        raise ValueError(verdict)
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        if overwrite and not resume_from_checkpoint:
            for old in list_checkpoints(output_dir):
                shutil.rmtree(old)
    barrier()
