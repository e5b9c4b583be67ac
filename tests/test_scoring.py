"""Calling reward functions and combining their values (grpo/scoring.py), without a model.

What a user relies on: sync and async reward functions are called alike (async ones concurrently,
also from inside a running event loop, as in a notebook), None means "no opinion" (0 in the
weighted sum, left out of the per-function means); a reward function that raises or returns a bad
value is an error naming the function, and the completion and row where there is one.
"""

import asyncio
import time

import pytest
import torch

from grpo.scoring import call_reward_functions, combine_rewards


def char_count(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


# ---------------------------------------------------------------- calling reward functions


def test_call_reward_functions_sync_async_and_none():
    def lengths(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    async def matches_solution(prompts, completions, solution, **columns):
        await asyncio.sleep(0)
        return [float(c == s) for c, s in zip(completions, solution)]

    def every_other(prompts, completions, **columns):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    results = call_reward_functions([lengths, matches_solution, every_other], ["p"] * 3, ["ab", "A", "xyz"],
                                    {"solution": ["ab", "B", "xyz"]})
    assert results == [[2.0, 1.0, 3.0], [1.0, 0.0, 1.0], [1.0, None, 1.0]]


def test_async_reward_functions_run_concurrently():
    async def slow_one(prompts, completions, **columns):
        await asyncio.sleep(1.0)
        return [1.0] * len(completions)

    async def slow_two(prompts, completions, **columns):
        await asyncio.sleep(1.0)
        return [2.0] * len(completions)

    start = time.perf_counter()
    results = call_reward_functions([slow_one, slow_two], ["p", "p"], ["a", "b"], {})
    assert time.perf_counter() - start < 1.7  # sequential would take 2 s
    assert results == [[1.0, 1.0], [2.0, 2.0]]


def test_reward_functions_can_be_called_from_a_running_event_loop():
    async def half(prompts, completions, **columns):
        return [0.5] * len(completions)

    async def notebook_cell():  # Jupyter runs cells inside an event loop
        return call_reward_functions([half, char_count], ["p"], ["abc"], {})

    assert asyncio.run(notebook_cell()) == [[0.5], [3.0]]


def _raises_sync(prompts, completions, **columns):
    raise KeyError("no such column")


async def _raises_async(prompts, completions, **columns):
    raise ValueError("judge unavailable")


def _too_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def _returns_none(prompts, completions, **columns):
    return None


@pytest.mark.parametrize("func, detail", [
    (_raises_sync, "KeyError"), (_raises_async, "judge unavailable"), (_too_short, "2 values for 3"),
    (_returns_none, "None"),
])
def test_reward_function_errors_name_the_function(func, detail):
    with pytest.raises(RuntimeError, match=func.__name__) as error:
        call_reward_functions([char_count, func], ["p"] * 3, ["a", "b", "c"], {})
    assert detail in str(error.value)


def test_combine_rewards_weights_and_none():
    total, per_func = combine_rewards([[1.0, None, 0.5, 2.0], [None, 3.0, 1.0, 1.0]], [2.0, 0.5])
    # None counts 0 in the weighted sum ...
    torch.testing.assert_close(total, torch.tensor([2.0, 1.5, 1.5, 4.5]))
    # ... and is NaN (excluded) in the per-function values the means are taken over.
    assert per_func.isnan().tolist() == [[False, True, False, False], [True, False, False, False]]


# ---------------------------------------------------------------- bad values


def _nan_second(prompts, completions, **columns):
    return [1.0, float("nan"), 1.0]


def _inf_third(prompts, completions, **columns):
    return [1.0, None, float("-inf")]


def _string_first(prompts, completions, **columns):
    return ["1.0", 1.0, 1.0]


def _too_many(prompts, completions, **columns):
    return [1.0] * 4


@pytest.mark.parametrize("func, expected", [
    (_nan_second, r"returned nan for completion 1 \(row id 'b'\): not a finite number"),
    (_inf_third, r"returned -inf for completion 2 \(row id 'c'\): not a finite number"),
    (_string_first, r"returned '1.0' for completion 0 \(row id 'a'\): a str, not a number"),
    (_too_many, r"returned 4 values for 3 completions"),
])
def test_bad_reward_values_are_errors_naming_function_completion_and_row(func, expected):
    with pytest.raises(RuntimeError, match=rf"reward function '{func.__name__}' {expected}"):
        call_reward_functions([char_count, func], ["p"] * 3, ["x", "y", "z"], {"id": ["a", "b", "c"]})


def test_none_numpy_and_bool_rewards_still_count():
    import numpy as np

    def mixed(prompts, completions, **columns):
        return [None, np.float32(0.5), True]

    assert call_reward_functions([mixed], ["p"] * 3, ["x", "y", "z"], {}) == [[None, np.float32(0.5), True]]
