"""Greedy evaluation: decode each item once (do_sample=False) and score it with reward functions."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from .models import family_for, unwrap
from .prompts import column, encode_prompts
from .sampling import GREEDY, decode_completions, generate
from .scoring import call_reward_functions, reward_columns, reward_name
from .decoding import StaticDecoder, wants_compiled_decoding
from .templates import check_reasoning_fits
from .tracking import Progress


def accuracy_name(reward_funcs, accuracy: str | None = None) -> str | None:
    """The name of the reward whose mean is reported as `accuracy`: `accuracy` (a reward's name, as
    `scoring.reward_name` gives it: "answer_reward"), else the first reward marked `is_accuracy = True`
    (rewards.accuracy_reward, rewards.answer_reward: rewards/__init__.py), else None: no accuracy is
    reported, rather than the mean of a reward that does not measure correctness (the format reward)."""
    names = [reward_name(f) for f in reward_funcs]
    if accuracy is not None:
        if accuracy not in names:
            raise ValueError(f"accuracy={accuracy!r} is not one of the reward functions; valid: {', '.join(names)}")
        return accuracy
    return next((name for name, f in zip(names, reward_funcs) if getattr(f, "is_accuracy", False) is True), None)


@torch.no_grad()
def evaluate(model, processor, dataset, reward_funcs, *, batch_size: int = 32, max_completion_length: int = 1024,
             max_prompt_length: int = 4096, output_path: str | None = None, resume: bool = False,
             progress: str | None = None, synced: bool = False, accuracy: str | None = None,
             chat_template_kwargs: dict | None = None, compile_decode: bool | str = "auto",
             decoder: StaticDecoder | None = None) -> dict:
    """Greedy-decode every row and score it.

    Returns {"accuracy": mean of the accuracy reward, "<name>": mean of each function,
    "mean_completion_tokens": ..., "records": per-item dicts in dataset order}. The accuracy reward is
    the one named `accuracy`, else the first marked `is_accuracy` (`accuracy_name`); with none, the
    result has no "accuracy" key. `output_path` (optional) receives the records as JSON lines,
    appended batch by batch so an interrupted run keeps what it finished. With `resume=True` the
    records already in `output_path` are kept and their rows (matched by `id`, else by index) are not
    decoded again. `progress`: a label to show a progress line on stderr with. `synced`: keep
    processes decoding in lockstep (DeepSpeed ZeRO-3, where every process evaluates the same rows).
    `chat_template_kwargs`: template arguments for the prompts (as in training: docs/families.md, Real checkpoints).
    `compile_decode`: decode with static shapes through a compiled forward (`grpo.decoding`; "auto": on
    CUDA only), or pass the `decoder` of a run that already compiled one.
    """
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    names = [reward_name(f) for f in funcs]
    accuracy_key = accuracy_name(funcs, accuracy)
    family = family_for(model, processor, quiet=True, chat_template_kwargs=chat_template_kwargs)
    check_reasoning_fits(family.template, funcs)
    params = replace(GREEDY, max_new_tokens=max_completion_length)
    if decoder is None and wants_compiled_decoding(compile_decode, next(unwrap(model).parameters()).device):
        decoder = StaticDecoder()
    device = next(unwrap(model).parameters()).device
    ids = [i if item_id is None else item_id for i, item_id in enumerate(column(dataset, "id"))]  # no image opened
    seen = {}
    for index, item_id in enumerate(ids):
        if item_id in seen:  # records are matched by id (resume, the returned list): two rows cannot share one
            raise ValueError(f"rows {seen[item_id]} and {index} have the same id {item_id!r}; give each row its own 'id'")
        seen[item_id] = index
    done = _finished_records(output_path, names) if resume else {}
    todo = [i for i in range(len(dataset)) if ids[i] not in done]
    if output_path:
        os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
        if not resume:
            open(output_path, "w").close()
    bar = Progress(len(todo), 0, progress) if progress and todo else None
    was_training = model.training
    model.eval()
    for start in range(0, len(todo), batch_size):
        index = todo[start : start + batch_size]
        rows = [dataset[i] for i in index]
        prompts = encode_prompts(family, rows, index, max_prompt_length).to(device)
        out = generate(family, model, prompts, params, synced=synced, decoder=decoder)
        texts = decode_completions(family, out)
        scores = call_reward_functions(funcs, [row["prompt"] for row in rows], texts,
                                        reward_columns(rows, out.ids, out.mask))
        batch_records = []
        for k, i in enumerate(index):
            record = {"id": ids[i], "completion": texts[k], "tokens": int(out.mask[k].sum()), "truncated": bool(out.truncated[k])}
            record.update({name: s[k] for name, s in zip(names, scores)})
            done[ids[i]] = record
            batch_records.append(record)
        if output_path:
            with open(output_path, "a") as f:
                f.writelines(json.dumps(record) + "\n" for record in batch_records)
        if bar:
            finished = [done[ids[i]] for i in todo[: start + len(index)]]
            shown = {"accuracy": _mean([r[accuracy_key] for r in finished]) or 0.0} if accuracy_key else {}
            bar.update(start + len(index), **shown)
    model.train(was_training)
    records = [done[i] for i in ids]
    result = {name: _mean([r[name] for r in records]) for name in names}
    if accuracy_key:
        result = {"accuracy": result[accuracy_key], **result}
    mean_tokens = sum(r["tokens"] for r in records) / max(1, len(records))
    return {**result, "mean_completion_tokens": mean_tokens, "records": records}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _finished_records(path: str | None, names: list[str]) -> dict:
    """Records already in `path` by id; a line cut by an interruption (the last one) is dropped."""
    if not path or not os.path.exists(path):
        return {}
    done = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write that was interrupted
            raise ValueError(f"{path}: line {number} is not valid JSON; delete the file to evaluate from scratch") from None
        missing = [name for name in names if name not in record]
        if missing:
            raise ValueError(f"{path}: line {number}: no score for {', '.join(missing)}; these records were made with other "
                             f"reward functions: delete the file or use another output path")
        done[record["id"]] = record
    # Rewrite without the cut line so appended records start on a line of their own.
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in done.values())
    return done
