"""What the GRPO and SFT trainers share: model loading, optimizer, metrics files, progress, checkpoints."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch


def load_model(model, dtype: str = "auto"):
    """A loaded model is returned as is; a name or a local directory goes through `from_pretrained`."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    from transformers import AutoModelForImageTextToText

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype)


def load_processor(processor, model_name):
    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        return processor
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor or model_name)


def freeze_vision_tower(model) -> None:
    """Freeze the vision encoder (the paper trains the language model only)."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise ValueError("freeze_vision_tower=True but the model has no `visual` module")
    for param in visual.parameters():
        param.requires_grad_(False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
                   schedule: str, total_updates: int):
    """AdamW over the trainable parameters with linear warmup then a constant or cosine schedule."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', got {schedule!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)

    def factor(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (update - warmup_steps) / max(1, total_updates - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class JsonlLog:
    """Append-only JSON-lines file; on resume, lines of steps after the checkpoint are dropped."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_to_builtin) + "\n")


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
        shown = " ".join(f"{k} {v:.3f}" for k, v in values.items())
        line = f"[{self.label}] step {step}/{self.total} {shown} | {rate:.2f} s/step | ETA {eta / 60:.1f} min"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if step == self.total else ""))
        elif step == self.total or done == 1 or step % max(1, self.total // 20) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- checkpoints

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(output_dir: str, step: int, model, processor, optimizer, scheduler, extra: dict,
                    total_limit: int | None) -> str:
    """Write `checkpoint-<step>/` atomically: into a temporary directory, then renamed.

    Holds the model and processor (`save_pretrained`, safetensors) and `trainer_state.pt` (optimizer,
    scheduler, step, RNG states, `extra`). A crash mid-save leaves only a `.tmp` directory that
    resume ignores.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        **extra,
    }
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.pt")):
        raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a checkpoint directory")
    return resume_from_checkpoint


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; returns the saved state dict."""
    # from_pretrained maps the checkpoint's saved key names back onto the module names.
    saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())
    del saved
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state
