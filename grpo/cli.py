"""One command line for your own data: `python -m grpo sft|grpo|evaluate --config run.yaml [--set key=value ...]`.

The YAML file names the model, the data, the prompt, the rewards and each command's settings; `--help`
lists every key. A key that is unknown or of the wrong type, or a file that is missing, is an error
naming the key and the config file. docs/command-line.md has a complete example.

This is where the library meets the repository's `data/` (rows, prompts) and `rewards/` packages, as
the examples do; since `python -m grpo` must live in `grpo/`, it imports them only inside the functions
that build rows and rewards, so `import grpo` never loads them. Their names come from
`data/registry.py` and `rewards/registry.py`: a new loader or reward is one line there, not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass

from .config import ConfigMixin, apply_overrides, check_keys, field_docs, load_yaml, save_yaml, unknown_key_error
from .evaluate import accuracy_name, evaluate
from .models import family_class
from .scoring import reward_name
from .sft import SFTConfig, SFTTrainer
from .trainer import GRPOConfig, Trainer
from .checkpoints import check_output_dir, resolve_model
from .loading import load_model, load_processor

PAPER_REWARDS = {"format": 1.0, "accuracy": 1.0}


@dataclass
class RunConfig(ConfigMixin):
    """The sections of a run's YAML file (`extends: other.yaml` starts from another file)."""

    model: str | None = None  # a hub name, a model directory, or a run's output_dir (its latest checkpoint)
    data: dict | None = None  # train / eval rows (below)
    prompt: dict | None = None  # how rows become chat messages (below)
    rewards: dict | None = None  # NAME: weight, or NAME: {weight: w, ...its settings}; default format + accuracy
    grpo: dict | None = None  # GRPOConfig fields, for `python -m grpo grpo`
    sft: dict | None = None  # SFTConfig fields, for `python -m grpo sft`
    evaluate: dict | None = None  # EvaluateConfig fields, for `python -m grpo evaluate`


@dataclass
class DataConfig(ConfigMixin):
    """`data:`: each part is a JSONL file, or {loader: NAME, limit: N, ...the loader's arguments}."""

    train: str | dict | None = None  # the training rows (sft, grpo)
    eval: str | dict | None = None  # held-out rows: `evaluate`, and GRPO's evaluation every grpo.eval_steps


@dataclass
class PromptConfig(ConfigMixin):
    """`prompt:`: the think/answer format of the paper, with a system turn."""

    system: str | None = "pathology"  # a named system prompt, your own text, or null for none (docs/families.md: System prompts)
    # The chat template's arguments for every command (sft, grpo, evaluate), e.g. {enable_thinking: true}
    # to train the think/answer format on Qwen3.5 (docs/families.md: Real checkpoints).
    chat_template_kwargs: dict | None = None


@dataclass
class EvaluateConfig(ConfigMixin):
    """`evaluate:`: greedy decoding of data.eval, scored by the rewards (docs/command-line.md)."""

    output_dir: str = "runs/eval"  # records.jsonl (one line per row) and summary.json go here
    batch_size: int = 32  # rows decoded together
    max_prompt_length: int = 4096  # a longer prompt is an error naming the row
    max_completion_length: int = 1024  # new tokens per row
    dtype: str = "auto"  # for from_pretrained: auto | float32 | bfloat16 | float16
    resume: bool = False  # keep the records already in output_dir and decode only the other rows
    compile_decode: bool | str = "auto"  # static-shape decoding through a compiled forward: auto (on for CUDA) | True | False
    accuracy: str | None = None  # reward reported as accuracy (answer, answer_reward); None: first marked is_accuracy


@dataclass
class Run:
    """A config file read and checked: every section parsed, ready for any command."""

    path: str
    values: dict  # the YAML with overrides applied (saved as run_config.yaml beside the run)
    model: str | None
    data: DataConfig
    prompt: PromptConfig
    rewards: dict
    grpo: GRPOConfig
    sft: SFTConfig
    evaluate: EvaluateConfig


def load_run(path: str, overrides: list[str] = ()) -> Run:
    """Read and check every section of a config file (overrides: `section.key=value` strings)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    values = apply_overrides(load_yaml(path), list(overrides))
    run = RunConfig.from_dict(values, source=path)
    return Run(
        path=path, values=values, model=run.model,
        data=DataConfig.from_dict(run.data or {}, source=f"{path} [data]"),
        prompt=PromptConfig.from_dict(run.prompt or {}, source=f"{path} [prompt]"),
        rewards=PAPER_REWARDS if run.rewards is None else run.rewards,
        grpo=GRPOConfig.from_dict(run.grpo or {}, source=f"{path} [grpo]"),
        sft=SFTConfig.from_dict(run.sft or {}, source=f"{path} [sft]"),
        evaluate=EvaluateConfig.from_dict(run.evaluate or {}, source=f"{path} [evaluate]"),
    )


# ---------------------------------------------------------------- data and rewards (data/ and rewards/)


_LOADERS_OWN = object()  # load_rows without a model: each loader's own image_token_pixels (Qwen2.5-VL's)


def load_rows(run: Run, part: str, image_token_pixels: int | None = _LOADERS_OWN) -> list[dict] | None:
    """The prompt rows of data.<part> (None when the config has none). `image_token_pixels`: the model's
    pixels per visual token (None: its processor sizes images), which a loader that takes it sizes
    images to, unless the config sets it."""
    from data import to_prompt_rows
    from data.registry import LOADERS, SYSTEM_PROMPTS

    source = getattr(run.data, part)
    if source is None:
        return None
    where = f"{run.path} [data.{part}]"
    spec = {"loader": "jsonl", "path": source} if isinstance(source, str) else dict(source)
    name, limit = spec.pop("loader", "jsonl"), spec.pop("limit", None)
    if name not in LOADERS:
        raise unknown_key_error(str(name), LOADERS, f"{where} loader")
    loader = LOADERS[name]
    params = inspect.signature(loader).parameters
    check_keys(spec, params, f"{where} (loader {name!r}; limit is every loader's)")
    missing = [key for key, param in params.items() if param.default is inspect.Parameter.empty and key not in spec]
    if missing:
        raise ValueError(f"{where}: loader {name!r} needs {', '.join(missing)}")
    if "image_token_pixels" in params and image_token_pixels is not _LOADERS_OWN:
        spec.setdefault("image_token_pixels", image_token_pixels)
    try:
        rows = loader(**spec)
    except (OSError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from error
    system = run.prompt.system
    if system is not None and system in SYSTEM_PROMPTS:
        system = SYSTEM_PROMPTS[system]
    elif system is not None and len(system.split()) == 1:  # one word is meant as a name, not as a prompt
        raise unknown_key_error(system, SYSTEM_PROMPTS, f"{run.path} [prompt.system] (a name, or your own text)")
    return to_prompt_rows(list(rows)[:limit], system_prompt=system, source=where)


def build_rewards(run: Run) -> tuple[list, list[float]]:
    """The reward callables of `rewards:` and their weights."""
    from rewards.registry import REWARDS

    funcs, weights = [], []
    for name, settings in run.rewards.items():
        where = f"{run.path} [rewards.{name}]"
        if settings is None or (isinstance(settings, (int, float)) and not isinstance(settings, bool)):
            settings = {"weight": 1.0 if settings is None else settings}
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: expected a weight or a mapping of settings, got {settings!r}")
        settings = dict(settings)
        weight = settings.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{where}: weight must be a number, got {weight!r}")
        if ":" in str(name):
            factory = _import_object(str(name), where, os.path.dirname(os.path.abspath(run.path)))
            use_as_is = not settings and not inspect.isclass(factory)  # a reward function itself
        elif name in REWARDS:
            factory, use_as_is = REWARDS[name], False
        else:
            raise unknown_key_error(str(name), [*REWARDS, "module:function"], f"{run.path} [rewards]")
        try:
            funcs.append(factory if use_as_is else factory(**settings))
        except (TypeError, ValueError) as error:
            accepted = ", ".join(inspect.signature(factory).parameters) or "none"
            raise ValueError(f"{where}: {error} (its settings: {accepted})") from error
        weights.append(float(weight))
    if not funcs:
        raise ValueError(f"{run.path} [rewards]: no reward; name at least one (format, accuracy, ...)")
    return funcs, weights


def _import_object(name: str, where: str, config_dir: str):
    """`module:attribute`, the module found from the current directory or the config file's directory."""
    module_name, _, attribute = name.partition(":")
    for folder in (os.getcwd(), config_dir):
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"{where}: cannot import {module_name!r} ({error}); it is looked up in the current "
                          f"directory, the config file's directory and the installed packages") from error
    if not hasattr(module, attribute):
        raise ValueError(f"{where}: module {module_name!r} ({module.__file__}) has no {attribute!r}")
    return getattr(module, attribute)


# ---------------------------------------------------------------- commands


def _model(run: Run) -> str:
    if not run.model:
        raise ValueError(f"{run.path}: model is missing (a hub name, a model directory or a run's output_dir)")
    return resolve_model(run.model)


def _processor(run: Run, part: str):
    """The model's processor and its pixels per visual token (the family's; None when the processor sizes
    images itself), what the data loaders size images to so that the processor does not resize them
    again. Checks first that data.<part> is there: rows are loaded next."""
    from transformers import AutoConfig

    from . import lora

    if getattr(run.data, part) is None:
        raise ValueError(f"{run.path}: data.{part} is missing (a JSONL file, or {{loader: NAME, ...}})")
    path = _model(run)
    processor = load_processor(None, path)
    config = AutoConfig.from_pretrained(lora.base_model_of(path) if lora.is_adapter_checkpoint(path) else path)
    return processor, family_class(config).image_token_pixels(processor)


def _accuracy(run: Run, funcs: list, section: str) -> str | None:
    """`<section>.accuracy` as the reward's own name: a key of `rewards:` (answer) or that name (answer_reward)."""
    name = getattr(run, section).accuracy
    if name is None:
        return None
    by_key = {str(key): reward_name(func) for key, func in zip(run.rewards, funcs)}
    name = by_key.get(name, name)
    try:
        return accuracy_name(funcs, name)
    except ValueError as error:
        raise ValueError(f"{run.path} [{section}.accuracy]: {error} (or their keys under rewards: "
                         f"{', '.join(by_key)})") from None


def _template_arguments(run: Run, config, section: str) -> None:
    """`prompt.chat_template_kwargs` into a trainer's config; the same key set differently in both is an error."""
    given = run.prompt.chat_template_kwargs
    if given is not None and config.chat_template_kwargs is not None and given != config.chat_template_kwargs:
        raise ValueError(f"{run.path}: prompt.chat_template_kwargs {given} and {section}.chat_template_kwargs "
                         f"{config.chat_template_kwargs} differ; set them in prompt: only")
    if given is not None:
        config.chat_template_kwargs = given


def _start(run: Run, config) -> str:
    """Refuse an output_dir holding another run before any model is loaded; save the config there."""
    check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    model = _model(run)
    if int(os.environ.get("RANK", "0")) == 0:
        save_yaml(run.values, os.path.join(config.output_dir, "run_config.yaml"))
    return model


def run_sft(run: Run) -> SFTTrainer:
    from data import sft_target

    processor, pixels = _processor(run, "train")
    rows = load_rows(run, "train", pixels)
    for row in rows:
        row["completion"] = row.get("completion") or sft_target(row)  # the row's own target, else think/answer
    _template_arguments(run, run.sft, "sft")
    trainer = SFTTrainer(_start(run, run.sft), processor, rows, run.sft)
    trainer.train()
    return trainer


def run_grpo(run: Run) -> Trainer:
    funcs, weights = build_rewards(run)
    run.grpo.accuracy = _accuracy(run, funcs, "grpo")
    processor, pixels = _processor(run, "train")
    rows, eval_rows = load_rows(run, "train", pixels), load_rows(run, "eval", pixels)
    _template_arguments(run, run.grpo, "grpo")
    trainer = Trainer(_start(run, run.grpo), processor, funcs, rows, run.grpo, reward_weights=weights,
                      eval_dataset=eval_rows)
    trainer.train()
    return trainer


def run_evaluate(run: Run) -> dict:
    from .distributed import default_device

    funcs, _ = build_rewards(run)
    accuracy = _accuracy(run, funcs, "evaluate")
    cfg = run.evaluate
    processor, pixels = _processor(run, "eval")
    rows = load_rows(run, "eval", pixels)
    path = _model(run)
    model = load_model(path, cfg.dtype).to(default_device())
    result = evaluate(model, processor, rows, funcs, batch_size=cfg.batch_size,
                      max_completion_length=cfg.max_completion_length, max_prompt_length=cfg.max_prompt_length,
                      output_path=os.path.join(cfg.output_dir, "records.jsonl"), resume=cfg.resume, progress="evaluate",
                      accuracy=accuracy, chat_template_kwargs=run.prompt.chat_template_kwargs,
                      compile_decode=cfg.compile_decode)
    summary = {"model": path, "rows": len(rows), **{k: v for k, v in result.items() if k != "records"}}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return result


COMMANDS = {"sft": run_sft, "grpo": run_grpo, "evaluate": run_evaluate}


# ---------------------------------------------------------------- --help


def keys_help(cls, indent: str = "  ") -> list[str]:
    """One line per field of a config dataclass: name, type, default and its doc."""
    docs, lines = field_docs(cls), []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "")
        lines.append(f"{indent}{f.name}: {f.type} = {default!r}" + (f"  # {doc}" if doc else ""))
    return lines


def _signature_text(func) -> str:
    return ", ".join(name for name in inspect.signature(func).parameters)


def help_text() -> str:
    """Every key of a config file, section by section (the epilog of --help)."""
    from data.registry import LOADERS, SYSTEM_PROMPTS
    from rewards.registry import REWARDS

    lines = ["the config file (YAML; `--set section.key=value` overrides any key):", ""]
    lines += keys_help(RunConfig, "")
    lines += ["", "data:", *keys_help(DataConfig),
              "  limit: int  # every loader's: the first N rows",
              "  loaders (their arguments): " + "; ".join(f"{n} ({_signature_text(f)})" for n, f in LOADERS.items()),
              "  a JSONL row: id, image (a path relative to the file) or images, question, options, solution,",
              "  answer_type, explanation, completion (SFT's target), and any other field (a reward column)",
              "", "prompt:", *keys_help(PromptConfig), f"  names: {', '.join(SYSTEM_PROMPTS)}",
              "", "rewards (NAME: weight, or NAME: {weight: w, ...settings}):"]
    lines += [f"  {name} (settings: {_signature_text(factory) or 'none'})" for name, factory in REWARDS.items()]
    lines += ["  module:function  your own: a reward callable, or a factory / class called with the settings"]
    for section, cls in (("grpo", GRPOConfig), ("sft", SFTConfig), ("evaluate", EvaluateConfig)):
        lines += ["", f"{section}: ({cls.__name__})", *keys_help(cls)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grpo", description=__doc__.split("\n\n")[0], epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(COMMANDS), help="sft | grpo (train) | evaluate (greedy, on data.eval)")
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value: dotted keys reach into sections (grpo.beta=0); the value is YAML")
    # The `deepspeed` launcher appends --local_rank=N; the trainers read LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](load_run(args.config, args.set))
