"""LoRA through PEFT: the one module of the library that knows the `peft` package (`pip install .[lora]`).

`GRPOConfig.lora` / `SFTConfig.lora` switch it on: `None` trains every weight (full fine-tuning); a
dict (from YAML) or a `peft.LoraConfig` wraps the model in a plain `peft.PeftModel` (task type
None, so forward kwargs pass through untouched) whose only trainable weights are the adapter's.

  targets     by default every `nn.Linear` of the language model (attention, MLP, Qwen3.5's
              linear-attention projections), found from `named_modules()`: the family's vision
              modules and the output head are left out unless `lora_vision=True`, so one default
              serves every family. Explicit `target_modules` are PEFT's (a list of names, a regex).
  reference   no second model: a fresh adapter's reference is the policy with its adapters
              disabled (the base model); a model that arrives with an adapter (continuing an earlier
              stage) keeps a frozen copy of that adapter, `REFERENCE`, and the reference pass
              switches to it. Either way the reference is the policy as the run started.
  files       checkpoints hold the adapter in PEFT's own layout (`adapter_config.json`,
              `adapter_model.safetensors`), loadable by `PeftModel.from_pretrained(base, path)`;
              `grpo.loading.merge_lora` writes a plain merged model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import sys

import torch

from .config import check_keys
from .models import unwrap

# The LoRA settings a config may give, with their defaults.
LORA_DEFAULTS = {
    "r": 16,  # rank
    "alpha": 32,  # scaling numerator: the update is (alpha / r) * B A
    # On the adapter's input in training forwards. 0 by default: dropout copies each adapted layer's
    # input (more activation memory than full fine-tuning, benchmarks/README.md) and makes the GRPO
    # ratio and KL noisy (the policy's training forward is no longer the rollout's policy).
    "dropout": 0.0,
    "target_modules": None,  # None: every nn.Linear of the language model; else PEFT's list of names or a regex
    "lora_vision": False,  # default targets include the vision tower and projector
    "modules_to_save": None,  # modules trained whole beside the adapter (PEFT's), e.g. ["lm_head"] for a random head
}
REFERENCE = "reference"  # the frozen copy of a continued adapter that the reference pass switches to
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_settings(lora, where: str) -> None:
    """Refuse unknown keys of a `lora` dict early (at config time, without importing peft)."""
    if lora is None or not isinstance(lora, dict):
        if lora is not None and type(lora).__name__ != "LoraConfig":
            raise ValueError(f"{where}: lora must be None, a dict of {', '.join(LORA_DEFAULTS)} or a peft.LoraConfig; "
                             f"got {type(lora).__name__}")
        return
    check_keys(lora, LORA_DEFAULTS, f"{where} lora")


def is_peft_model(model) -> bool:
    """Whether `model` (or the model a DeepSpeed engine holds) is a PeftModel: `unwrap` looks through it."""
    return unwrap(model) is not getattr(model, "module", model)


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs the peft package: pip install -e '.[lora]'") from error
    return peft


def default_targets(model, family, lora_vision: bool) -> str:
    """A regex (PEFT matches it against full module names) naming every `nn.Linear` of the language
    model, and of the vision tower and projector when `lora_vision`; never the output head.
    Layer indices are generalised (`layers.\\d+.`), so the pattern stays short for a 7B model."""
    hf = unwrap(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    vision = {id(m) for module in family.vision_modules(hf) for m in module.modules()}
    names = [name for name, m in hf.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not head and (lora_vision or id(m) not in vision)]
    if not names:
        raise ValueError(f"{type(hf).__name__}: no nn.Linear layers outside the vision modules and the output head "
                         f"to put LoRA adapters on; name them in lora.target_modules")
    # One pattern per layer position; kept literal where the general one would also match a module
    # that is no target (the GELU between the Linears of a Sequential: `mlp.0`, `mlp.1`, `mlp.2`).
    chosen, every = set(names), [name for name, _ in hf.named_modules()]
    general = {name: r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))
               for name in names}
    exact = {p: all(n in chosen for n in every if re.fullmatch(p, n)) for p in set(general.values())}
    patterns = {p if exact[p] else re.escape(name) for name, p in general.items()}
    return "(?:" + "|".join(sorted(patterns)) + ")"


def _check_targets(hf, family, targets) -> None:
    """Every explicit target (a name PEFT matches as a suffix, or a regex) must match some module."""
    names = [name for name, _ in hf.named_modules()]
    items = [targets] if isinstance(targets, str) else list(targets)
    regex = isinstance(targets, str)
    for target in items:
        if any(re.fullmatch(target, n) if regex else (n == target or n.endswith("." + target)) for n in names):
            continue
        vision = {id(m) for module in family.vision_modules(hf) for m in module.modules()}
        linear = {side: sorted({n.rsplit(".", 1)[-1] for n, m in hf.named_modules()
                                if isinstance(m, torch.nn.Linear) and (id(m) in vision) == (side == "vision")})
                  for side in ("language", "vision")}
        raise ValueError(f"lora.target_modules: {target!r} matches no module of {type(hf).__name__}; its nn.Linear "
                         f"layers are named (last part) {', '.join(linear['language']) or 'none'} in the language "
                         f"model and {', '.join(linear['vision']) or 'none'} in the vision modules")


def lora_config(settings, model, family):
    """A `peft.LoraConfig` (task type None) from our settings dict or a user's LoraConfig."""
    peft = _peft()
    hf = unwrap(model)
    given = isinstance(settings, peft.LoraConfig)
    values = {**LORA_DEFAULTS, **({} if given else settings)}
    targets = settings.target_modules if given else values["target_modules"]
    if targets is None:
        targets = default_targets(hf, family, values["lora_vision"])
    else:
        _check_targets(hf, family, targets)
    if given:
        return dataclasses.replace(settings, task_type=None, target_modules=targets)
    return peft.LoraConfig(r=values["r"], lora_alpha=values["alpha"], lora_dropout=values["dropout"],
                           target_modules=targets, modules_to_save=values["modules_to_save"], task_type=None)


def prepare(model, family, settings):
    """The model to train: with `settings`, a `PeftModel` with a fresh adapter; a model that already
    is a `PeftModel` (an earlier stage's adapter) with `settings=None` continues its active adapter,
    made trainable; anything else is returned as it is (full fine-tuning)."""
    if not is_peft_model(model):
        if settings is None:
            return model
        return _peft().get_peft_model(model, lora_config(settings, model, family))
    adapters = list(model.peft_config)
    if settings is not None:
        found = ", ".join(f"{name}: {type(c).__name__} r={getattr(c, 'r', '?')}" for name, c in model.peft_config.items())
        raise ValueError(
            f"the model is already a PeftModel with adapter(s) {adapters} ({found}); lora= would put "
            f"a second adapter on top. To continue training its adapter set lora=None; to train a fresh adapter on "
            f"the model it makes, merge it first (grpo.merge_lora, or model.merge_and_unload())")
    if REFERENCE in adapters and model.active_adapter != REFERENCE:
        model.delete_adapter(REFERENCE)  # an earlier run's reference: this run's is its starting adapter
        adapters.remove(REFERENCE)
    if len(adapters) != 1:
        raise ValueError(f"the PeftModel holds adapters {adapters}; continuing needs exactly one (merge or delete the others)")
    model.set_adapter(model.active_adapter)  # trainable, also when it was loaded for inference
    return model


def add_reference_adapter(model) -> None:
    """A frozen copy of the active adapter under the name `REFERENCE`: the reference of a run that
    continues an adapter (the policy as the run starts)."""
    peft = _peft()
    active = model.active_adapter
    model.add_adapter(REFERENCE, copy.deepcopy(model.peft_config[active]))
    weights = peft.get_peft_model_state_dict(model, adapter_name=active)
    peft.set_peft_model_state_dict(model, weights, adapter_name=REFERENCE)
    model.set_adapter(active)  # the trained one stays active and trainable; the copy frozen


@contextlib.contextmanager
def reference_mode(model):
    """Within: `model` (a PeftModel, or an engine holding one) computes the reference policy:
    switched to the frozen `REFERENCE` adapter if it has one, else with its adapters disabled."""
    model = getattr(model, "module", model)
    if REFERENCE not in model.peft_config:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    model.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(active)


def adapts(modules) -> bool:
    """Whether any of `modules` holds a LoRA layer (then its outputs differ with adapters off)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for module in modules for m in module.modules())


# ---------------------------------------------------------------- files


def is_adapter_checkpoint(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def base_model_of(adapter_dir: str) -> str:
    """The base model an adapter was trained on, as its `adapter_config.json` names it."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path is empty: the "
                         f"base was built in memory); pass the base model explicitly")
    return base


def with_adapter(base, adapter_dir: str, trainable: bool = True):
    """`base` with the adapter saved in `adapter_dir` (plain `PeftModel.from_pretrained`)."""
    return _peft().PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    """The active adapter's parameters, modules_to_save included (what a checkpoint saves)."""
    model = getattr(model, "module", model)
    tag = f".{model.active_adapter}."
    return [p for name, p in model.named_parameters() if tag in name]


def save_adapter(model, directory: str, gather_zero3: bool, write: bool, attempt=None) -> None:
    """The active adapter into `directory` in PEFT's layout. Under ZeRO-3 its shards are gathered
    first (collective: every process calls this; only `write` writes). `attempt(func, *args, **kwargs)`,
    when given, makes the write (the checkpoint code records a failed write instead of raising)."""
    gathered = contextlib.nullcontext()
    if gather_zero3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(adapter_parameters(model), modifier_rank=None)
    with gathered:
        if write:
            (attempt or _call)(model.save_pretrained, directory, selected_adapters=[model.active_adapter],
                               safe_serialization=True)


def _call(func, *args, **kwargs):
    return func(*args, **kwargs)


def load_adapter_weights(model, directory: str) -> None:
    """The adapter saved in `directory` into `model`'s active adapter (exact resume)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    result = _peft().set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{directory}: adapter weights {missing[:4]} fit no layer of the model")

