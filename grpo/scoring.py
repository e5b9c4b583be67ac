"""Calling reward functions and combining their results: the "score" stage of a GRPO step, also used
by evaluation.

A reward function is a plain callable `f(prompts, completions, **columns) -> list[float | None]`
(sync or async; None means "does not apply to this completion" and counts 0 in the sum). Anything
else than a finite number or None (NaN, inf, a string) is an error naming the function, the
completion and its row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers as numbers_

import torch

from .distributed import all_gather_objects


def reward_name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def call_reward_functions(funcs, prompts, completions, columns) -> list[list[float | None]]:
    """Call every reward function; coroutine functions (or ones returning awaitables) run concurrently."""

    async def run_all():
        pending, results = {}, [None] * len(funcs)
        for i, func in enumerate(funcs):
            try:
                value = func(prompts=prompts, completions=completions, **columns)
            except Exception as error:
                raise RuntimeError(f"reward function {reward_name(func)!r} raised {type(error).__name__}: {error}") from error
            if inspect.isawaitable(value):
                pending[i] = value
            else:
                results[i] = value
        for i, value in zip(pending, await asyncio.gather(*pending.values(), return_exceptions=True)):
            if isinstance(value, BaseException):
                raise RuntimeError(f"reward function {reward_name(funcs[i])!r} raised {type(value).__name__}: {value}") from value
            results[i] = value
        return results

    results = _run_coroutine(run_all())
    for func, values in zip(funcs, results):
        check_rewards(func, values, len(completions), columns.get("id"))
    return results


def check_rewards(func, values, count: int, row_ids=None) -> None:
    """`values` must be `count` finite numbers or None; else an error naming the function, the first
    bad completion (its index in the call) and its row (`row_ids`: each completion's row id)."""
    if values is None or not hasattr(values, "__len__") or len(values) != count:
        got = "None" if values is None else f"{len(values)} values" if hasattr(values, "__len__") else repr(values)
        raise RuntimeError(f"reward function {reward_name(func)!r} returned {got} for {count} completions")
    for index, value in enumerate(values):
        if value is None:
            continue
        is_number = isinstance(value, numbers_.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        if not is_number or not math.isfinite(float(value)):
            row = f"row id {row_ids[index]!r}" if row_ids is not None else "its row has no 'id' field"
            what = "not a finite number" if is_number else f"a {type(value).__name__}, not a number"
            raise RuntimeError(f"reward function {reward_name(func)!r} returned {value!r} for completion {index} "
                               f"({row}): {what}; return a finite float, or None where the reward does not apply")


def reward_stats(funcs) -> dict:
    """Statistics that reward functions report through a `stats()` method (a judge's counters), keyed
    `<name>/<key>`, over all processes: whole numbers (counts) are summed, other numbers averaged over
    the processes that report them (so a latency quantile is the processes' mean quantile).
    Collective: every process calls it."""
    local = {}
    for func in funcs:
        if callable(getattr(func, "stats", None)):
            local.update({f"{reward_name(func)}/{key}": value for key, value in func.stats().items()})
    merged = {}
    for key, values in _by_key(all_gather_objects(local)).items():
        numbers = [v for v in values if isinstance(v, numbers_.Real) and not isinstance(v, bool)]
        if numbers and all(isinstance(v, numbers_.Integral) for v in numbers):
            merged[key] = int(sum(numbers))
        elif numbers:
            merged[key] = float(sum(numbers)) / len(numbers)
        else:
            merged[key] = next((v for v in values if v is not None), None)
    return merged


def _by_key(dicts: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for d in dicts:
        for key, value in d.items():
            out.setdefault(key, []).append(value)
    return out


def _run_coroutine(coroutine):
    """asyncio.run, also from code that already runs an event loop (a notebook): there in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def combine_rewards(results, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum per completion (None counts 0) and each function's mean/std over its non-None values."""
    # [F, N]: one row per reward function
    per_func = torch.tensor([[float("nan") if v is None else float(v) for v in values] for values in results])
    total = (torch.nan_to_num(per_func, nan=0.0) * torch.tensor(weights)[:, None]).sum(0)
    return total, per_func


def reward_columns(rows: list[dict], completion_ids: torch.Tensor | None = None,
                   completion_mask: torch.Tensor | None = None) -> dict[str, list]:
    """The columns reward functions receive: the rows' fields other than `prompt` (one row per
    completion) and, given the completions' tokens [N, C] and mask, `completion_ids`: each
    completion's token ids as a list, up to and including its EOS (as TRL passes them; a length
    reward such as `rewards.overlong_penalty` reads them)."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    if completion_ids is not None:
        if "completion_ids" in columns:
            raise ValueError("dataset rows have a field 'completion_ids', the name of the column that holds each "
                             "completion's token ids: rename the field")
        columns["completion_ids"] = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]
    return columns
