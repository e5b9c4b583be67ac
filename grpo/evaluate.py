"""Greedy evaluation: decode each item once (do_sample=False) and score it with reward functions."""

from __future__ import annotations

import json
import os

import torch

from .rollout import encode_prompts, forbidden_token_ids, generate


@torch.no_grad()
def evaluate(model, processor, dataset, reward_funcs, *, batch_size: int = 32, max_completion_length: int = 1024,
             max_prompt_length: int = 4096, output_path: str | None = None, synced: bool = False) -> dict:
    """Greedy-decode every row and score it.

    Returns {"accuracy": mean of the FIRST reward function (the accuracy), "<name>": mean of each
    function, "mean_completion_tokens": ..., "records": per-item dicts}. `output_path` (optional)
    receives the records as JSON lines. `synced`: keep processes decoding in lockstep (DeepSpeed
    ZeRO-3, where every process evaluates the same rows).
    """
    from .trainer import call_reward_functions, decode_completions, reward_name

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    tokenizer = getattr(processor, "tokenizer", processor)
    eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    records = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        prompts = encode_prompts(processor, rows, list(range(start, start + len(rows))), max_prompt_length).to(device)
        out = generate(model, prompts, group_size=1, max_new_tokens=max_completion_length, eos_token_ids=eos_ids,
                       pad_token_id=pad_id, temperature=0.0, forbidden_ids=forbidden_token_ids(tokenizer), synced=synced)
        texts = decode_completions(tokenizer, out.ids, out.mask, set(eos_ids) | {pad_id})
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
        scores = call_reward_functions(funcs, [row["prompt"] for row in rows], texts, columns)
        for i, row in enumerate(rows):
            record = {"id": row.get("id", start + i), "completion": texts[i], "tokens": int(out.mask[i].sum()),
                      "truncated": bool(out.truncated[i])}
            record.update({reward_name(f): s[i] for f, s in zip(funcs, scores)})
            records.append(record)
    model.train(was_training)
    result = {}
    for func in funcs:
        values = [r[reward_name(func)] for r in records if r[reward_name(func)] is not None]
        result[reward_name(func)] = sum(values) / len(values) if values else None
    result = {"accuracy": result[reward_name(funcs[0])], **result,
              "mean_completion_tokens": sum(r["tokens"] for r in records) / max(1, len(records)), "records": records}
    if output_path:
        os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
        with open(output_path, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return result
