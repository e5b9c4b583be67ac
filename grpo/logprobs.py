"""Log-probs of completions under a model, and the forwards over prompts they are built from.

`group_logprobs` is the trainer's one entry point (policy, old-policy and reference log-probs);
`completion_logprobs` is the same computation for users, on dataset rows and token-id lists.

A GRPO group shares one prompt (and image) across its G completions, so the work that depends on
the prompt only is done once where the model family allows it exactly (`Family.fast_path`):
`with_image_features` runs the frozen vision tower once per image per step and every later forward
reuses the features; `packed_logprobs` forwards each prompt once followed by all its completions,
under a mask that keeps the completions apart, and `shared_prefix_logprobs` (for families whose
layers cannot take that mask: sliding windows, linear attention) forwards each prompt once and lets
its completions attend to the prompt's KV cache; either way gradients flow back into the shared
prompt once. `plain_logprobs`
(one forward over prompt + completion per completion) is what every other model runs and what the
shared path is tested against. Positions always come from the family (3-D mRoPE for the Qwen
families) and are passed explicitly, so the rollout and every training forward use the same ones.
"""

from __future__ import annotations

import torch

from .models import Family, family_for, unwrap
from .prompts import PromptBatch, encode_prompts


def vision_kwargs(family: Family, prompts: PromptBatch) -> dict:
    """Model kwargs for the prompts' images: cached features when present, else the pixels."""
    if not prompts.has_images:
        return {}
    if prompts.image_features is not None:
        return family.features_kwargs([f for f in prompts.image_features if f is not None])
    return prompts.pixel_inputs()


@torch.no_grad()
def with_image_features(family: Family, model, prompts: PromptBatch) -> PromptBatch:
    """`prompts` with each prompt's image features computed once by `model` (no gradient).

    Only valid where the features need no gradient: a frozen vision tower, or forwards without
    gradient (rollout, old-policy and reference log-probs). Families without a fast path, models
    whose forward cannot take features back (`Family.caches_features`), and prompts without images,
    are returned as they are.
    """
    if not family.caches_features or not prompts.has_images:
        return prompts
    features = iter(family.image_features(model, prompts.pixel_inputs(), prompts))
    return PromptBatch(prompts.input_ids, prompts.attention_mask, prompts.token_types, prompts.image_inputs,
                       prompts.images_per_prompt, [next(features) if n else None for n in prompts.images_per_prompt])


def prefill(family: Family, model, prompts: PromptBatch, logits_to_keep: int = 1):
    """One forward over the prompts keeping their KV cache and last logits; also their positions."""
    positions = family.positions(model, prompts.input_ids, prompts.token_types, prompts.pixel_inputs(),
                                 prompts.attention_mask)
    out = model(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **family.forward_kwargs(prompts.token_types),
        **vision_kwargs(family, prompts),
    )
    return out, positions


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, with_entropy: bool = False):
    """log softmax(logits / temperature) at `ids`, [N, C] fp32, one row at a time (no [N, C, V] fp32
    tensor).

    `with_entropy=True` returns (log-probs, entropies): also each position's predictive entropy
    -sum_v p log p of softmax(logits / temperature), [N, C] fp32, from the same row (for
    `high_entropy_mask`).
    """
    rows, entropies = [], []
    for row_logits, row_ids in zip(logits, ids):
        row_logits = row_logits.float() / temperature  # [C, V]
        normaliser = torch.logsumexp(row_logits, dim=-1)  # [C]
        rows.append(row_logits.gather(-1, row_ids[:, None]).squeeze(-1) - normaliser)
        if with_entropy:  # -sum p (z - logsumexp z) = logsumexp z - sum p z
            entropies.append(normaliser - (torch.softmax(row_logits, dim=-1) * row_logits).sum(-1))
    if with_entropy:
        return torch.stack(rows), torch.stack(entropies)
    return torch.stack(rows)


def plain_logprobs(family: Family, model, prompts: PromptBatch, completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs [N, C] (fp32) of each completion token, from one forward over prompt + completion.

    `prompts` holds one prompt per completion (use `PromptBatch.select`). Logits are divided by the
    sampling temperature; only the chosen tokens' log-probs are gathered. `with_entropy`: also the
    token entropies, as `gather_logprobs` returns them.
    """
    input_ids = torch.cat([prompts.input_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], dim=1)
    token_types = torch.cat([prompts.token_types, torch.zeros_like(completion_ids)], dim=1)
    positions = family.positions(model, input_ids, token_types, prompts.pixel_inputs(), attention_mask)
    length = completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=False,
        logits_to_keep=length + 1,
        **family.forward_kwargs(token_types),
        **vision_kwargs(family, prompts),
    )
    # The logits at position t predict completion token t.
    return gather_logprobs(out.logits[:, :-1], completion_ids, temperature, with_entropy)


def shared_prefix_logprobs(family: Family, model, prompts: PromptBatch, prompt_index: list[int],
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                           temperature: float = 1.0, with_entropy: bool = False):
    """`plain_logprobs` with each prompt forwarded once for all the completions that continue it.

    `prompts` holds the distinct prompts; completion i continues prompt `prompt_index[i]`. The prompt
    forward keeps its KV cache, which is indexed out to the completions (an autograd-tracked copy, so
    the completions' gradients add up in the shared prompt); the completion forward attends to it
    with the rollout's positions. The last completion token is never fed: nothing it predicts is scored.
    """
    device = completion_ids.device
    out, positions = prefill(family, model, prompts)
    rep = torch.as_tensor(prompt_index, device=device)
    first = gather_logprobs(out.logits[rep], completion_ids[:, :1], temperature, with_entropy)  # [N, 1]
    length = completion_ids.shape[1]
    if length == 1:
        return first
    cache = family.cache_of(out)
    family.select_cache(cache, rep)
    attention_mask = torch.cat([prompts.attention_mask[rep], completion_mask[:, :-1].to(prompts.attention_mask.dtype)], dim=1)
    out = model(
        input_ids=completion_ids[:, :-1],
        attention_mask=attention_mask,
        position_ids=family.continuation_positions(family.next_position(positions)[rep], length - 1),
        **family.continuation_kwargs(completion_ids[:, :-1]),
        **family.cache_kwargs(model, cache),
    )
    rest = gather_logprobs(out.logits, completion_ids[:, 1:], temperature, with_entropy)  # [N, C - 1]
    if with_entropy:
        return tuple(torch.cat(parts, dim=1) for parts in zip(first, rest))
    return torch.cat([first, rest], dim=1)


def packed_logprobs(family: Family, model, prompts: PromptBatch, prompt_index: list[int],
                    completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    temperature: float = 1.0, with_entropy: bool = False):
    """`shared_prefix_logprobs` as one forward without a KV cache: each prompt followed by all its
    completions in one sequence, under a mask that lets every completion see the prompt and its
    own earlier tokens only.

    Row b of the forward is prompt b (left-padded, P tokens), then K slots of C - 1 tokens, slot k
    holding the k-th completion of prompt b (K: the most completions any prompt has, G in a training
    step; an unused slot is padding that only sees itself). Each slot takes the positions that continue its prompt, as
    in the rollout. Against the cached path this keeps one copy of the prompt's keys and values per
    prompt instead of one per completion, and it runs under gradient checkpointing (which turns the
    KV cache off). Needs a family whose layers all attend fully (`Family.can_pack`).
    """
    device = completion_ids.device
    N, C = completion_ids.shape
    B, P = prompts.input_ids.shape
    slots: list[list[int]] = [[] for _ in range(B)]  # completion indices of each prompt, in order
    for i, b in enumerate(prompt_index):
        slots[b].append(i)
    K, fed = max(len(s) for s in slots), C - 1  # slots per prompt, tokens fed per slot
    ids = torch.full((B, K, fed), family.pad_id, dtype=completion_ids.dtype, device=device)
    for b, members in enumerate(slots):
        ids[b, : len(members)] = completion_ids[members, :-1]
    input_ids = torch.cat([prompts.input_ids, ids.view(B, K * fed)], dim=1)  # [B, P + K (C - 1)]
    positions = family.positions(model, prompts.input_ids, prompts.token_types, prompts.pixel_inputs(),
                                 prompts.attention_mask)
    continuation = family.continuation_positions(family.next_position(positions), fed)  # [(3,) B, C - 1]
    positions = torch.cat([positions, continuation.repeat(*([1] * (continuation.dim() - 1)), K)], dim=-1)
    token_types = torch.cat([prompts.token_types, torch.zeros_like(input_ids[:, P:])], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=packed_mask(prompts.attention_mask, K, fed, family.attention_implementation(model),
                                   unwrap(model).dtype),
        position_ids=positions,
        use_cache=False,
        logits_to_keep=K * fed + 1,
        **family.forward_kwargs(token_types),
        **vision_kwargs(family, prompts),
    )
    # The last prompt position predicts every completion's first token; slot position t its token t + 1.
    index = torch.as_tensor(prompt_index, device=device)
    parts = [gather_logprobs(out.logits[index, 0][:, None], completion_ids[:, :1], temperature, with_entropy)]
    if fed:
        slot_logits = out.logits[:, 1:].view(B, K, fed, -1)  # [B, K, C - 1, V]
        rest = [gather_logprobs(slot_logits[b, : len(members)], completion_ids[members, 1:], temperature, with_entropy)
                for b, members in enumerate(slots) if members]
        order = torch.as_tensor([i for members in slots for i in members], device=device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(N, device=device)
        if with_entropy:
            parts.append(tuple(torch.cat(kind)[inverse] for kind in zip(*rest)))
        else:
            parts.append(torch.cat(rest)[inverse])
    if with_entropy:
        return tuple(torch.cat(kind, dim=1) for kind in zip(*parts))
    return torch.cat(parts, dim=1)


def packed_mask(prompt_mask: torch.Tensor, slots: int, length: int, implementation: str | None, dtype,
                decoding: bool = False) -> torch.Tensor:
    """The attention mask of a packed row: the prompt (left-padded, `prompt_mask` [B, P]) followed by
    `slots` completions of `length` tokens each.

    For `packed_logprobs` (slot-major: slot 1's tokens, then slot 2's, ...): [B, 1, W, W], W = P +
    slots * length the packed row's width; a prompt token sees the real prompt tokens up to itself, a completion token the
    real prompt tokens and its own slot's tokens up to itself, and every token itself (a padding row
    must see something). With `decoding` (step-major: step 0's `slots` tokens, then step 1's, ...;
    one query per slot): [B, 1, slots, W], the query of slot g seeing the real prompt tokens and
    every key of slot g; the caller cuts the keys to the steps fed so far. Boolean (True: attend)
    for sdpa, additive (0 / the dtype's minimum) for eager attention.
    """
    B, P = prompt_mask.shape
    device = prompt_mask.device
    W = P + slots * length
    real_key = torch.cat([prompt_mask.bool(), torch.ones(B, W - P, dtype=torch.bool, device=device)], dim=1)
    if decoding:
        key_slot = torch.cat([torch.full((P,), -1, device=device), torch.arange(slots, device=device).repeat(length)])
        sees = (key_slot[None, :] == torch.arange(slots, device=device)[:, None]) | (key_slot[None, :] == -1)
        mask = sees[None] & real_key[:, None, :]  # [B, slots, W]
    else:
        seq = torch.arange(W, device=device)
        slot = torch.cat([torch.full((P,), -1, device=device),
                          torch.arange(slots, device=device).repeat_interleave(length)])
        causal = seq[None, :] <= seq[:, None]  # [W, W] key <= query
        same_part = (slot[None, :] == slot[:, None]) | (slot[None, :] == -1)  # own slot, or the prompt
        mask = (causal & same_part)[None] & real_key[:, None, :]
        mask = mask | torch.eye(W, dtype=torch.bool, device=device)[None]
    mask = mask[:, None]  # [B, 1, queries, W]
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


def _packing_pays(prompts: PromptBatch, prompt_index: list[int], length: int) -> bool:
    """Whether the packed forward's attention ((P + K (C - 1))^2 per prompt: the mask is dense) is at
    most twice the cached path's (P^2 + K (C - 1) (P + C - 1)); C - 1 tokens are fed per completion
    (C = `length`), K completions per prompt (G in a training step). Short completions (the benchmark's 64 after a 460-token prompt: 1.5x) pack; G long
    ones do not (4 x 1024 after 1024: 2.8x), and there the cached path's per-completion copy of the
    prompt's keys and values is small beside the weights anyway. Under gradient checkpointing the
    packed forward runs whatever this says: the cached one cannot run there."""
    P, fed = prompts.input_ids.shape[1], length - 1
    K = max(prompt_index.count(b) for b in set(prompt_index))
    return (P + K * fed) ** 2 <= 2 * (P * P + K * fed * (P + fed))


def _checkpointing(model) -> bool:
    """Whether gradient checkpointing is on (it turns the KV cache off, so the cached shared path cannot run)."""
    module = unwrap(model)
    name = "is_activation_checkpointing" if hasattr(type(module), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(module, name, False)) and module.training


def group_logprobs(family: Family, model, prompts: PromptBatch, prompt_index: list[int], completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor, temperature: float = 1.0, shared_prefix: bool = True,
                   with_entropy: bool = False):
    """Log-probs [N, C] of completions under `model`; completion i continues prompt `prompt_index[i]`.

    The shared-prefix path runs when asked and when the family has an exact one: packed into one
    forward where the model allows it (`Family.can_pack`) and it pays (`_packing_pays`, or under
    gradient checkpointing), else through the prompt's KV cache (not under gradient checkpointing);
    otherwise the plain path (one prompt copy per completion). `with_entropy=True`
    returns (log-probs, token entropies [N, C]), computed row by row from the same logits.
    """
    checkpointing = _checkpointing(model)
    if shared_prefix and family.fast_path and family.can_pack(model) and (
            checkpointing or _packing_pays(prompts, prompt_index, completion_ids.shape[1])):
        return packed_logprobs(family, model, prompts, prompt_index, completion_ids, completion_mask, temperature,
                               with_entropy)
    if shared_prefix and family.fast_path and not checkpointing:
        return shared_prefix_logprobs(family, model, prompts, prompt_index, completion_ids, completion_mask, temperature,
                                      with_entropy)
    return plain_logprobs(family, model, prompts.select(list(prompt_index)), completion_ids, completion_mask, temperature,
                          with_entropy)


def completion_logprobs(model, processor, rows: list[dict], completion_ids: list[list[list[int]]], *,
                        temperature: float = 1.0, shared_prefix: bool = True, max_prompt_length: int = 1 << 20,
                        chat_template_kwargs: dict | None = None) -> list[list[torch.Tensor]]:
    """Per-token log-probs of completions continuing dataset rows, as the trainer computes them.

    `rows`: dataset rows (`prompt` chat messages, `image` / `images`); `completion_ids[i]`: a list of
    completions (lists of token ids, any lengths, at least one token each) continuing `rows[i]`.
    Returns, per row and completion, a 1-D float32 tensor with the log-prob of each of its tokens
    under `model` (logits divided by `temperature`). Runs with gradient when grad mode is on.
    `chat_template_kwargs`: the template arguments the prompts were rendered with in training.
    """
    if len(completion_ids) != len(rows):
        raise ValueError(f"{len(completion_ids)} lists of completions for {len(rows)} rows")
    family = family_for(model, processor, quiet=True, chat_template_kwargs=chat_template_kwargs)
    device = next(unwrap(model).parameters()).device
    prompts = encode_prompts(family, rows, list(range(len(rows))), max_prompt_length).to(device)
    if shared_prefix:
        prompts = with_image_features(family, model, prompts)
    flat = [(i, list(ids)) for i, group in enumerate(completion_ids) for ids in group]
    if not flat:
        return [[] for _ in rows]
    for i, ids in flat:
        if not ids:
            raise ValueError(f"row {i}: an empty completion (no token to score)")
    width = max(len(ids) for _, ids in flat)
    ids = torch.full((len(flat), width), family.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for k, (_, row_ids) in enumerate(flat):
        ids[k, : len(row_ids)] = torch.tensor(row_ids, device=device)
        mask[k, : len(row_ids)] = 1
    logprobs = group_logprobs(family, model, prompts, [i for i, _ in flat], ids, mask, temperature, shared_prefix)
    result = [[] for _ in rows]
    for k, (i, row_ids) in enumerate(flat):
        result[i].append(logprobs[k, : len(row_ids)])
    return result
