"""What the GRPO and SFT trainers share: process and model set-up, metrics files, progress, checkpoints."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch

from .distributed import (
    all_gather_objects, barrier, default_device, init_distributed, is_main_process, launched_distributed,
    read_deepspeed_spec, reference_deepspeed_config, shard, world, zero_stage,
)
from . import lora
from .models import family_for


def load_model(model, dtype: str = "auto"):
    """A loaded model is returned as is; a name or a local directory goes through `from_pretrained`.
    A LoRA checkpoint (an adapter directory) loads as its base model with the adapter on it."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    if lora.is_adapter_checkpoint(model):
        return lora.with_adapter(load_model(lora.base_model_of(model), dtype), model)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    config = AutoConfig.from_pretrained(model)
    # Vision-language models first; a text-only model (text-only rows) loads as a causal LM.
    auto = AutoModelForImageTextToText if type(config) in AutoModelForImageTextToText._model_mapping else AutoModelForCausalLM
    return auto.from_pretrained(model, dtype=torch_dtype)


def load_processor(processor, model_name):
    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        return processor
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor or model_name)


def freeze_vision_tower(model, family) -> None:
    """Freeze the modules that make image features (the paper trains the language model only).
    A text-only model has none: nothing to freeze."""
    for module in family.vision_modules(model):
        module.requires_grad_(False)


def vision_modules_equal(ours: list, theirs: list) -> bool:
    """Whether two models' vision modules hold the same weights (then they may share image features)."""
    if not ours or len(ours) != len(theirs):
        return False
    for a, b in zip(ours, theirs):
        if a is b:
            continue
        if any(hasattr(p, "ds_id") for p in a.parameters()):
            return False  # ZeRO-3 partitions: the local tensors are placeholders, not the weights
        other = dict(b.named_parameters())
        if not all(name in other and torch.equal(p, other[name]) for name, p in a.named_parameters()):
            return False
    return True


def rows_for_step(dataset, step: int, per_step: int, seed: int, name: str) -> tuple[list[dict], list[int]]:
    """This process's rows of a step and their indices: a seeded permutation per epoch, so the data
    position is a function of the step (resuming continues exactly); `per_step` rows over all
    processes, split evenly (`name` is the config field that sets it, for the error)."""
    indices = shard(step_row_indices(len(dataset), step, per_step, seed), name)  # a group never spans processes
    return [dataset[i] for i in indices], indices


def step_row_indices(dataset_size: int, step: int, per_step: int, seed: int) -> list[int]:
    """The row indices of a step over all processes (`rows_for_step` before the split)."""
    indices = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, dataset_size)
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch))
        indices.append(int(order[offset]))
    return indices


# Seeds of consecutive runs' epoch permutations never collide for fewer than this many epochs (a prime).
_EPOCH_SEED_STRIDE = 7919


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_processes(cfg) -> torch.device:
    """Join the process group a launcher started (if any) and return this process's device."""
    if launched_distributed() and not cfg.deepspeed:
        raise ValueError(
            f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but deepspeed is None: multi-process training runs "
            f"on DeepSpeed; set deepspeed='zero2' (replicated weights) or 'zero3' (sharded weights)")
    init_distributed(bool(cfg.deepspeed))
    return default_device()


def prepare_model(model, processor, cfg, device):
    """Load (if given a name or path), move to `device` unless DeepSpeed places it, freeze the vision
    tower if asked, enable gradient checkpointing if asked, and with `cfg.lora` wrap it in a PEFT
    model whose adapter is what trains (a model that already carries an adapter continues it:
    grpo/lora.py). Returns (model, processor, family)."""
    name = model if isinstance(model, (str, os.PathLike)) else None
    model = load_model(model, cfg.dtype)
    processor = load_processor(processor, name)
    family = family_for(model, processor, chat_template_kwargs=cfg.chat_template_kwargs)
    if not cfg.deepspeed:
        model.to(device)
    if cfg.freeze_vision_tower:
        freeze_vision_tower(model, family)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the rollout passes use_cache=True explicitly
    model = lora.prepare(model, family, cfg.lora)
    return model, processor, family


def vision_trains(family, model) -> bool:
    """Whether any weight that makes image features trains (then cached features, which carry no
    gradient, cannot stand in for the pixels in a training forward)."""
    return any(p.requires_grad for module in family.vision_modules(model) for p in module.parameters())


def prepare_reference_model(ref_model, policy, family, cfg, device):
    """The frozen reference policy for the KL term: `ref_model` (name, path or model) or a copy of
    the policy. Under ZeRO-3 it is sharded like the policy (an inference-only engine); otherwise
    every process holds a full copy, less the policy's frozen vision modules: they stay as they
    are for the whole run, so the copy shares them instead of copying them (Qwen2.5-VL-7B's tower
    is 0.67 B parameters).

    Under LoRA without a `ref_model` there is no second model: None is returned and the reference is
    the policy itself in `lora.reference_mode` (adapters off; a continued adapter keeps a frozen copy
    of itself as it started, added here).
    """
    if ref_model is None and lora.is_peft_model(policy):
        if cfg.lora is None:  # continuing an adapter: the reference is that adapter as it starts
            lora.add_reference_adapter(policy)
        return None
    zero3 = bool(cfg.deepspeed) and zero_stage(read_deepspeed_spec(cfg.deepspeed)) == 3
    if ref_model is not None:
        ref = load_model(ref_model, cfg.dtype)
    else:
        # Not under ZeRO-3: each engine partitions the parameters of its own modules.
        frozen = [] if zero3 or vision_trains(family, policy) else family.vision_modules(policy)
        ref = copy.deepcopy(policy, memo={id(module): module for module in frozen})
    ref.eval().requires_grad_(False)
    if zero3:
        import deepspeed

        # Inference only: the policy's batch sizes, accumulation and clipping are not checked here.
        ds = reference_deepspeed_config(cfg.deepspeed, bf16=next(ref.parameters()).dtype == torch.bfloat16)
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()
        return engine
    return ref.to(device)


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


# ---------------------------------------------------------------- checkpoints

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
