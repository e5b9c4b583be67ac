"""DAPO's soft overlong punishment: a length-only reward on the completion's token count."""

from __future__ import annotations


def overlong_penalty(max_completion_length: int, buffer: int):
    """A reward callable: 0 for completions of up to `max_completion_length - buffer` tokens, then
    falling linearly to -1 at `max_completion_length` (and -1 beyond): (max - buffer - n) / buffer.

    It reads the `completion_ids` column (each completion's token ids, up to and including its EOS),
    which the trainer and `evaluate` pass to every reward function. Add it to the other rewards, as
    DAPO does: `reward_funcs=[accuracy_reward, overlong_penalty(1024, 256)]`.
    """
    if buffer < 1 or buffer > max_completion_length:
        raise ValueError(f"buffer must be between 1 and max_completion_length={max_completion_length} tokens, got {buffer}")
    start = max_completion_length - buffer

    def overlong_penalty(prompts, completions, completion_ids=None, **columns) -> list[float]:
        if completion_ids is None:
            raise ValueError("overlong_penalty reads the completions' token ids from the `completion_ids` column, "
                             "which the trainer and evaluate() pass; pass it when calling the reward directly")
        return [max(-1.0, min(0.0, (start - len(ids)) / buffer)) for ids in completion_ids]

    return overlong_penalty
