"""Data parallelism: process-group helpers, DeepSpeed ZeRO configs, and the one optimisation interface
both trainers use, whether they run as one plain PyTorch process or under DeepSpeed.

Launch with any standard launcher (`torchrun --nproc_per_node N`, `deepspeed`, their multi-node
flags); the trainers read RANK / WORLD_SIZE / LOCAL_RANK from the environment. With one process and
`deepspeed=None` nothing here touches torch.distributed.

`Optimization` hides the difference between the two update paths:
  plain      AdamW + LambdaLR, gradients accumulated by repeated backward, clipped, stepped.
  deepspeed  the same AdamW and schedule handed to `deepspeed.initialize`; the engine owns ZeRO
             partitioning, gradient averaging across ranks, clipping and bf16.
Either way a trainer calls `backward(loss)` per micro-batch and `step()` once per optimizer update,
and weights its losses so that the update equals the single-process update on the global batch.
An update whose loss or gradient norm is not finite is dropped on both paths (`step`).
A bf16/fp16 model is updated through fp32 master weights on both paths: `MasterWeights` on the
plain one (`master_weights` in the configs), DeepSpeed's own bf16 mode on the other.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import json
import math
import os
import sys

import torch
import torch.distributed as dist

ZERO_PRESETS = ("zero2", "zero3")


# ---------------------------------------------------------------- process group


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def launched_distributed() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(use_deepspeed: bool) -> None:
    """Initialise the process group once when a launcher asked for several processes (or DeepSpeed).

    NCCL on GPUs, gloo otherwise (DeepSpeed on CPU needs DS_ACCELERATOR=cpu and gloo).
    """
    if not (launched_distributed() or use_deepspeed) or (dist.is_available() and dist.is_initialized()):
        return
    if "RANK" not in os.environ:  # DeepSpeed in a plain `python script.py`: a process group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    atexit.register(_leave_process_group)
    _note_uncaught_exceptions()


# How long a process that is done waits at exit for the others (which may still be saving or evaluating).
EXIT_BARRIER_TIMEOUT_S = 600
_uncaught_exception = False


def _note_uncaught_exceptions() -> None:
    """Chain sys.excepthook so that the exit handler knows a process is dying of an exception."""
    previous = sys.excepthook

    def hook(*exc_info):
        global _uncaught_exception
        _uncaught_exception = True
        previous(*exc_info)

    sys.excepthook = hook


def _leave_process_group() -> None:
    """At exit: wait for the other processes, then tear the process group down.

    A process that exits while another still holds its gloo connections aborts now and then
    ("terminate called without an active exception", exit code -6) after all its work is done, and
    the launcher then reports the run as failed. So a process that finished normally waits (bounded)
    for the others first. One dying of an exception does not wait: the launcher stops the others.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not _uncaught_exception and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_TIMEOUT_S))
        except Exception:  # a process that never came: leave anyway
            pass
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_device() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over ranks (a copy; `value` itself when there is one process)."""
    if world()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_cat(value: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `value` along dim 0, in rank order. Shapes must match across ranks
    except dim 0; ragged dim 0 is padded for the exchange and trimmed after."""
    rank, size = world()
    if size == 1:
        return value
    length = torch.tensor([value.shape[0]], device=value.device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros((longest, *value.shape[1:]), dtype=value.dtype, device=value.device)
    padded[: value.shape[0]] = value
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)])


def all_gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order (`[value]` with one process)."""
    size = world()[1]
    if size == 1:
        return [value]
    gathered = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, device) -> bool:
    """True if `flag` is True on any rank (used to keep ZeRO-3 decode loops in lockstep)."""
    if world()[1] == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item() > 0)


def check_images_on_every_rank(images_per_prompt: list[int], row_indices: list[int], device) -> None:
    """Under ZeRO-3, refuse prompts of which some carry images and others do not (collective: every
    process calls it with its own prompts, and all raise together).

    Every forward of a ZeRO-3 vision tower gathers its sharded parameters on all processes at once;
    a process whose prompts (or micro-batch) hold no image skips that forward and leaves the others
    waiting forever. Across all processes, either every prompt has an image or none has.
    """
    _, size = world()
    if size == 1:
        return
    mine = sum(count > 0 for count in images_per_prompt)
    with_images, prompts = all_reduce_sum(torch.tensor([mine, len(images_per_prompt)], device=device)).tolist()
    if 0 < with_images < prompts:
        without = [index for index, count in zip(row_indices, images_per_prompt) if count == 0]
        raise ValueError(
            f"under DeepSpeed ZeRO-3 either every prompt has an image or none has, but {with_images} of the {prompts} "
            f"prompts on the {size} processes have one (rows without an image here: {without[:8] or 'none'}): the "
            f"vision tower's forward gathers its sharded weights on all processes together, so a process without an "
            f"image would leave the others waiting. Give every row an image, drop the text-only rows, or use zero2")


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard(items: list, name: str) -> list:
    """This rank's contiguous share of `items`; its length must divide by the world size."""
    rank, size = world()
    if len(items) % size:
        raise ValueError(f"{name}={len(items)} must be divisible by the number of processes ({size})")
    per_rank = len(items) // size
    return items[rank * per_rank : (rank + 1) * per_rank]


# ---------------------------------------------------------------- DeepSpeed configs

# The update's sizes and clipping. The trainer config is their one source: a DeepSpeed config may
# leave them out or set them to "auto"; an explicit value must equal the trainer's.
UPDATE_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
# Sections DeepSpeed would build its own optimizer / LR schedule from. The trainers hand it their
# AdamW and schedule, and DeepSpeed then ignores these sections without a word: refuse them instead.
OWN_SECTIONS = {"optimizer": "learning_rate, weight_decay and adam_betas",
                "scheduler": "warmup_steps and lr_scheduler"}


def read_deepspeed_spec(spec) -> dict:
    """The user's DeepSpeed settings as a new dict, from a preset ("zero2" / "zero3"), a JSON path or a dict."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    if spec in ZERO_PRESETS:
        stage = int(spec[-1])
        zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
        if stage == 3:
            zero.update({"stage3_gather_16bit_weights_on_model_save": True})
        return {"zero_optimization": zero}
    if isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
        with open(spec) as f:
            return json.load(f)
    raise ValueError(f"deepspeed must be one of {ZERO_PRESETS}, a path to a DeepSpeed JSON file or a dict; got {spec!r}")


def deepspeed_config(spec, *, micro_batch_size: int, accumulation_steps: int, max_grad_norm: float, bf16: bool,
                     offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """The DeepSpeed config of the model being trained, from a preset ("zero2" / "zero3"), a JSON path or a dict.

    Batch sizes, gradient accumulation, clipping and bf16 (the model's dtype) always come from the
    trainer config, so no number is given twice: a user JSON may leave them out or set them to
    "auto"; a different explicit value is an error naming the key. `optimizer` / `scheduler`
    sections are errors too (the trainer's own AdamW and schedule are used).
    """
    config = read_deepspeed_spec(spec)
    for section, fields in OWN_SECTIONS.items():
        if section in config:
            raise ValueError(f"DeepSpeed config has a {section!r} section, which would be ignored: the trainer hands "
                             f"DeepSpeed its own AdamW and LR schedule. Remove it and set {fields} in the trainer config")
    _, size = world()
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in ours.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(f"DeepSpeed config sets {key}={given!r} but the trainer config implies {value!r}; "
                             f"remove it from the DeepSpeed config or set it to \"auto\"")
        config[key] = value
    # bf16 follows the dtype the model was loaded in: DeepSpeed's bf16 mode expects bf16 weights (and
    # keeps fp32 masters), so enabling it for an fp32 model, or disabling it for a bf16 one, is refused.
    given = (config.get("bf16") or {}).get("enabled", "auto")
    if given != "auto" and bool(given) != bf16:
        raise ValueError(f"DeepSpeed config sets bf16.enabled={given!r} but the model is {'' if bf16 else 'not '}loaded "
                         f"in bfloat16; bf16 follows the model's dtype: load the model with "
                         f"dtype='{'bfloat16' if given else 'float32'}' or remove bf16.enabled (or set it to \"auto\")")
    config["bf16"] = {**(config.get("bf16") or {}), "enabled": bf16}
    zero = config.setdefault("zero_optimization", {})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        if zero.get("stage") != 3:
            raise ValueError("offload_params needs ZeRO stage 3 (deepspeed='zero3')")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # We hand DeepSpeed our own torch AdamW; allow it next to CPU offload too.
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**9)
    return config


def reference_deepspeed_config(spec, *, bf16: bool) -> dict:
    """The DeepSpeed config of the frozen reference model (an inference-only engine under ZeRO-3).

    The reference never steps, so the user's batch sizes, accumulation and clipping describe the
    policy's update, not it: they are dropped here rather than checked against the placeholder
    micro-batch of 1 that DeepSpeed needs (which would call a correct config a conflict). Its
    optimizer offload is dropped too (no optimizer).
    """
    config = read_deepspeed_spec(spec)
    for key in UPDATE_KEYS:
        config.pop(key, None)
    config.get("zero_optimization", {}).pop("offload_optimizer", None)
    return deepspeed_config(config, micro_batch_size=1, accumulation_steps=1, max_grad_norm=0.0, bf16=bf16)


def zero_stage(config: dict | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------- optimisation


def nan_if_not_finite(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, or `loss` x NaN when it is not finite: its gradient is then NaN in every parameter it
    reaches, even where the loss's own gradient was finite (a NaN at a masked-out position), so the
    gradient norm says what the loss did, and under DeepSpeed the averaged gradient is NaN on every
    process, which makes all of them drop the update. One sync per micro-batch (the trainers read
    the loss anyway)."""
    return loss if bool(torch.isfinite(loss.detach()).all()) else loss * float("nan")


def make_optimizer(params: list[torch.Tensor], lr: float, weight_decay: float, betas: tuple[float, float],
                   warmup_steps: int, schedule: str, total_updates: int):
    """AdamW over `params` with linear warmup then a constant or cosine schedule."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', got {schedule!r}")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)

    def factor(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (update - warmup_steps) / max(1, total_updates - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_master_weights(cfg) -> None:
    """`master_weights=False` is refused under DeepSpeed, whose bf16 mode keeps fp32 masters regardless."""
    if not cfg.master_weights and cfg.deepspeed:
        raise ValueError("master_weights=False applies without DeepSpeed only: DeepSpeed's bf16 mode always keeps fp32 "
                         "master weights and AdamW states; remove master_weights or set deepspeed=None")


class MasterWeights:
    """The tensors AdamW updates: an fp32 master copy of each bf16/fp16 trainable parameter, the
    parameter itself when it is fp32 already (a LoRA adapter: PEFT keeps it in fp32) or when
    `enabled` is False.

    A bf16 number has 8 significant bits: a weight of magnitude 0.01 moves in steps of ~6e-5, so an
    AdamW update of ~lr (1e-6-1e-5) made on the bf16 weight itself rounds to nothing, step after
    step. The masters accumulate those updates in fp32 (and AdamW's moments are fp32 with them);
    the model gets their bf16 rounding after every update. Each backward's gradients are added into
    the masters' fp32 `.grad` at once (`collect_grads`), so accumulation over micro-batches is fp32 too.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], enabled: bool = True):
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.masters = [param.detach().float() if enabled and param.dtype in LOW_PRECISION else param
                        for param in self.params]
        self._copied = [(param, master) for param, master in zip(self.params, self.masters) if master is not param]

    def collect_grads(self) -> None:
        """Add the model's gradients of the last backward into the masters' fp32 `.grad` (and free them)."""
        for param, master in self._copied:
            if param.grad is None:
                continue
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model's parameters := their masters, rounded to the model's dtype."""
        for param, master in self._copied:
            param.copy_(master)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """The masters := the model's parameters (a checkpoint written without master weights)."""
        for param, master in self._copied:
            master.copy_(param)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The separate master copies by parameter name (empty when there is none)."""
        return {name: master for name, param, master in zip(self.names, self.params, self.masters) if master is not param}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, torch.Tensor], source: str) -> None:
        """Restore the master copies saved by `state_dict` (in `source`, named in messages), and the
        model's parameters from them. The model's weights must be loaded first: a checkpoint
        written without master copies (or a run without them) starts them from those."""
        mine = self.state_dict()
        if not saved or not mine:
            self.copy_from_model()
            if (saved or mine) and is_main_process():
                print(f"[grpo] {source} was written {'with' if saved else 'without'} fp32 master weights and is "
                      f"resumed {'with' if mine else 'without'}: "
                      f"{'they start from its bf16/fp16 weights' if mine else 'its bf16/fp16 weights are used'}; "
                      f"the run does not continue exactly as it would have", file=sys.stderr)
            return
        if saved.keys() != mine.keys():
            missing, unknown = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
            raise ValueError(f"{source}: the saved master weights do not fit the model's trainable bf16/fp16 parameters "
                             f"(missing: {missing[:4]}, not trainable here: {unknown[:4]}); resume with the "
                             f"freeze_vision_tower and lora settings the checkpoint was written with")
        for name, master in mine.items():
            master.copy_(saved[name])
        self.copy_to_model()


class Optimization:
    """The model being trained, its optimizer and LR schedule, plain or under a DeepSpeed engine.

    `module` is what forwards are called on (the engine under DeepSpeed); `model` is always the
    underlying Hugging Face model. `micro_batches_per_update` is how many `backward` calls make one
    update; DeepSpeed needs it for its config. `master_weights` holds what the optimizer updates
    (fp32 masters of the bf16/fp16 trainable weights on the plain path, `cfg.master_weights`).
    """

    def __init__(self, model, cfg, total_updates: int, micro_batches_per_update: int, micro_batch_size: int):
        self.model = model
        self.max_grad_norm = cfg.max_grad_norm
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # DeepSpeed's bf16 mode keeps its own fp32 masters: it is handed the parameters themselves.
        self.master_weights = MasterWeights(trainable, enabled=cfg.master_weights and not cfg.deepspeed)
        self.optimizer, self.scheduler = make_optimizer(
            self.master_weights.masters, cfg.learning_rate, cfg.weight_decay, cfg.adam_betas, cfg.warmup_steps,
            cfg.lr_scheduler, total_updates)
        self.engine = None
        self.ds_config = None
        self._pending = 0
        self.micro_batches_per_update = micro_batches_per_update
        self.skipped_updates = 0  # updates dropped for a non-finite loss or gradient norm
        if cfg.deepspeed:
            import deepspeed

            bf16 = next(model.parameters()).dtype == torch.bfloat16
            self.ds_config = deepspeed_config(
                cfg.deepspeed, micro_batch_size=micro_batch_size, accumulation_steps=micro_batches_per_update,
                max_grad_norm=cfg.max_grad_norm, bf16=bf16, offload_optimizer=cfg.offload_optimizer,
                offload_params=cfg.offload_params)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=self.ds_config)

    @property
    def module(self):
        return self.engine if self.engine is not None else self.model

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's (already weighted) loss."""
        self._pending += 1
        loss = nan_if_not_finite(loss)
        if self.engine is None:
            loss.backward()
            self.master_weights.collect_grads()
            return
        self.engine.set_gradient_accumulation_boundary(self._pending == self.micro_batches_per_update)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """One optimizer update from the accumulated gradients; returns the global pre-clip grad norm.

        A non-finite gradient norm (a non-finite loss makes it NaN: `backward`) drops the update:
        the gradients are cleared and neither AdamW (weights and their fp32 masters, moments, step
        count) nor the LR schedule moves; `skipped_updates` counts it. Under DeepSpeed the engine
        decides (ZeRO-1/2/3 reduce the norm, so every process drops it together, and the schedule
        does not step); an engine that applies such an update anyway (ZeRO stage 0) is an error.
        """
        if self._pending != self.micro_batches_per_update:
            raise RuntimeError(f"{self._pending} backward calls for an update of {self.micro_batches_per_update} micro-batches")
        self._pending = 0
        if self.engine is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.master_weights.masters, self.max_grad_norm))
            if math.isfinite(grad_norm):
                self.optimizer.step()
                self.scheduler.step()
                self.master_weights.copy_to_model()
            else:
                self.skipped_updates += 1
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not self.engine.was_step_applied():
            self.skipped_updates += 1
        elif not math.isfinite(grad_norm):
            raise RuntimeError(
                f"DeepSpeed applied an update whose gradient norm is {grad_norm} (ZeRO stage {self.zero_stage} does not "
                f"drop non-finite updates); the weights are no longer finite: resume from the last checkpoint with "
                f"deepspeed='zero2' or 'zero3'")
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
