"""Sampling G completions per prompt with a KV cache, and decoding them to text.

`SamplingParams` is the one record of how tokens are drawn (the trainer's rollout, evaluation's
greedy decoding and users' own calls all pass one). `generate` prefills each prompt once where the
family allows it (otherwise each of the G copies is prefilled), then samples token by token until
every completion has ended with one of the family's end-of-turn ids; the family's vision special
tokens are never sampled. A packing family (`Family.can_pack`) decodes a prompt's G completions in
one row under a mask; the others repeat the prompt's cache G times. Either way each step's keys and
values are written into room reserved in the cache (`reserve_cache`), or, with `compile_decode`, into
a static cache whose shapes never change (`grpo.decoding`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .decoding import StaticDecoder
from .distributed import any_rank
from .logprobs import packed_mask, prefill
from .models import Family, unwrap
from .prompts import PromptBatch


@dataclass(frozen=True)
class SamplingParams:
    """How completion tokens are drawn."""

    max_new_tokens: int = 1024  # tokens per completion; a completion without EOS by then is truncated
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # only the k most likely tokens (0 = off)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"sampling needs temperature >= 0, top_p in (0, 1] and top_k >= 0; got temperature="
                             f"{self.temperature}, top_p={self.top_p}, top_k={self.top_k}")


GREEDY = SamplingParams(temperature=0.0)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    """One token per row from [N, V] logits."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > params.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).float()
    uniforms = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return draw(probs, uniforms)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of [N, V] probabilities (unnormalised is fine), by an exponential race: the
    index of the smallest E_i / p_i (its arrival time) wins, E_i = -log(u_i) being independent Exp(1)
    from `uniforms` (in [0, 1), [N, V]); index i wins with probability p_i / sum(p).

    `torch.multinomial` runs the same race for one sample, but draws its exponentials 4x slower on
    the CPU (0.84 ms against 0.21 ms for 64 rows x 628 entries; it was ~9% of a demo GRPO step). A race,
    unlike drawing by inverse CDF from one uniform per row, changes its winner under a small change
    of the probabilities only about as often as the distributions differ (about their total
    variation), so float32 and bf16 runs, or compiled and eager decoding, sample mostly the same
    tokens (tests/test_sampling.py). An index of probability zero never wins: the uniforms are kept
    above zero, so every E_i is finite and every positive p_i beats a zero one."""
    exponentials = uniforms.clamp(min=torch.finfo(uniforms.dtype).tiny).log_().neg_()
    return (probs / exponentials).argmax(-1)


@dataclass
class Completions:
    """G sampled completions per prompt, prompt-major: completion i belongs to prompt i // G."""

    ids: torch.Tensor  # [N, C] pad after EOS
    mask: torch.Tensor  # [N, C] 1 up to and including EOS
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens


@torch.no_grad()
def generate(family: Family, model, prompts: PromptBatch, params: SamplingParams, *, group_size: int = 1,
             generator: torch.Generator | None = None, synced: bool = False, shared_prefix: bool = True,
             decoder: StaticDecoder | None = None) -> Completions:
    """Sample `group_size` completions per prompt (N = B * group_size), prompt-major.

    Fast-path families prefill each prompt once (the vision tower not at all when `prompts` carries
    cached features), then decode its G completions in one row (`packed`: each step feeds [B, G]
    tokens at one position, `packed_mask` keeping the completions apart) or repeat its cache G
    times (one token per row). The other families, and every family with `shared_prefix=False` (the
    trainer's plain path), prefill each of the G copies, images included. Both sample the same
    tokens from the same generator. `synced` (needed
    under DeepSpeed ZeRO-3, where every forward gathers parameters collectively) keeps all
    processes decoding until the last one is done, so a process whose completions end early does
    not leave the others hanging. With a `decoder` (`grpo.decoding`) every decoding step has the same
    shapes (a cache preallocated for the whole completion, masks of one shape; packing families still
    decode packed) and may be compiled; the tokens are the same.
    """
    device = prompts.input_ids.device
    shared = family.fast_path and shared_prefix
    static = decoder is not None and decoder.usable(family, model)
    packed = shared and family.can_pack(model) and group_size > 1 and (
        not static or family.attention_implementation(model) == "sdpa")
    if shared:
        out, positions = prefill(family, model, prompts)
        cache = family.cache_of(out)
        if not packed:
            family.repeat_cache(cache, group_size)
        logits = out.logits[:, -1].float().repeat_interleave(group_size, 0)  # [N, V]
        attention_mask = prompts.attention_mask.repeat_interleave(group_size, 0)
        next_position = family.next_position(positions)  # [B]
        if not packed:
            next_position = next_position.repeat_interleave(group_size, 0)  # [N]
    else:
        copies = prompts.select([i for i in range(len(prompts)) for _ in range(group_size)])
        out, positions = prefill(family, model, copies)
        cache = family.cache_of(out)
        logits = out.logits[:, -1].float()
        attention_mask = copies.attention_mask
        next_position = family.next_position(positions)
    if static:  # a packed row takes G tokens per step
        prompt_length = attention_mask.shape[1]
        fed_tokens = params.max_new_tokens * (group_size if packed else 1)
        cache = decoder.static_cache(model, cache, prompt_length, fed_tokens)
        length = decoder.cache_length(prompt_length, fed_tokens)
        static_mask = attention_mask.new_zeros(attention_mask.shape[0], length)  # [N, length]
        static_mask[:, :prompt_length] = attention_mask
    else:
        reserve_cache(cache, params.max_new_tokens * (group_size if packed else 1))
    if packed:  # the G tokens of a prompt's completions go in one row: [prompt | step 0's G | step 1's G | ...]
        decode_mask = packed_mask(prompts.attention_mask, group_size, params.max_new_tokens,
                                  family.attention_implementation(model), unwrap(model).dtype, decoding=True)
        if static:  # [B, 1, G, length]: the room past the completion masked, and at each step the keys not yet written
            decode_mask = torch.nn.functional.pad(decode_mask, (0, length - decode_mask.shape[-1]))
            key_slot = torch.arange(length, device=device)
    n = logits.shape[0]
    check_every = done_check_interval(device)
    eos = torch.tensor(family.eos_ids, device=device)
    forbidden = torch.tensor(family.forbidden_ids, dtype=torch.long, device=device)  # made once, not at every step
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = []
    with _grouped_attention(device) if packed else contextlib.nullcontext():
        for step in range(params.max_new_tokens):
            if len(forbidden):
                logits.index_fill_(1, forbidden, float("-inf"))
            token = sample_tokens(logits, params, generator)
            token = torch.where(finished, torch.full_like(token, family.pad_id), token)
            tokens.append(token)
            finished = finished | torch.isin(token, eos)
            if step == params.max_new_tokens - 1:
                break
            if synced:  # every process asks at every step (a collective)
                if not any_rank(not bool(finished.all()), device):
                    break
            elif (step + 1) % check_every == 0 and bool(finished.all()):
                break
            if packed:
                fed = token.view(-1, group_size)  # [B, G]
                positions = family.continuation_positions(next_position + step, 1)
                positions = positions.expand(*positions.shape[:-1], group_size)
                if static:
                    mask = decode_mask & (key_slot < prompt_length + (step + 1) * group_size)
                else:
                    mask = decode_mask[..., : prompts.input_ids.shape[1] + (step + 1) * group_size]
            elif static:  # the same shapes at every step: the token's column of the mask set in place
                fed = token[:, None]  # [N, 1]
                positions = family.continuation_positions(next_position + step, 1)
                static_mask[:, prompt_length + step] = 1
                mask = static_mask
            else:
                fed = token[:, None]  # [N, 1]
                positions = family.continuation_positions(next_position + step, 1)
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                mask = attention_mask
            inputs = dict(input_ids=fed, attention_mask=mask, position_ids=positions, **family.continuation_kwargs(fed),
                          **family.cache_kwargs(model, cache))
            out = decoder.step(model, **inputs) if static else model(**inputs)
            cache = cache if static else family.cache_of(out)
            logits = (out.logits.reshape(n, -1) if packed else out.logits[:, -1]).float()
            if static:  # a CUDA-graph replay writes its outputs into the same buffers: ours to edit (forbidden ids)
                logits = logits.clone()
    ids = torch.stack(tokens, dim=1)  # [N, C]
    is_eos = torch.isin(ids, eos)
    if check_every > 1 and not synced and bool(is_eos.any(1).all()):  # the steps past the last EOS: pad only
        ids = ids[:, : int(is_eos.int().argmax(1).max()) + 1]
        is_eos = is_eos[:, : ids.shape[1]]
    # 1 on every token up to and including the first EOS (all tokens when there is none).
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return Completions(ids=ids, mask=mask.long(), truncated=~is_eos.any(1))


def done_check_interval(device: torch.device) -> int:
    """Decoding steps between two checks that every completion has ended. Each check waits for the
    device (a host synchronisation): on a GPU that would stop the host from queueing the next steps
    while the current one runs, so it checks every 16 steps and cuts the extra steps (padding only)
    off afterwards; the tokens are the same. On the CPU, which runs each step before returning,
    every step."""
    return 16 if torch.device(device).type == "cuda" else 1


class _ReservedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values sit in buffers with room for the tokens still to be
    decoded: each step writes its token's keys and values in place, and `keys` / `values` are views
    of the filled part. transformers' `DynamicLayer` concatenates instead, which copies the whole
    cache at every step (half the decoding time of a 460-token prompt and 64 completion tokens on
    CPU). Past the reserved room it falls back to concatenation."""

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        self.device, self.is_initialized, self.length = layer.keys.device, True, layer.keys.shape[-2]
        self._keys, self._values = (torch.cat([t, t.new_empty(*t.shape[:-2], room, t.shape[-1])], dim=-2)
                                    for t in (layer.keys, layer.values))
        self.keys, self.values = layer.keys, layer.values

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end <= self._keys.shape[-2]:
            self._keys[..., self.length:end, :] = key_states
            self._values[..., self.length:end, :] = value_states
            self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        else:  # out of room: from here on the layer grows by concatenation
            self.keys, self.values = super().update(key_states, value_states)
            self._keys, self._values = self.keys, self.values
        self.length = end
        return self.keys, self.values


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def _grouped_attention(device):
    """On CPU, let transformers hand sdpa grouped keys and values (`enable_gqa`) even with a mask.

    transformers (5.24) copies every key/value head out to its query heads whenever a mask is given
    and more than one query is fed, as CUDA's masked kernels need. Packed decoding feeds G queries
    per row with a mask, so that copy would rewrite the whole cache at every step; torch's CPU
    kernel takes the heads grouped. transformers reads the switch, an environment variable, at
    every attention call; it is set only while decoding packed rows, and only on CPU. (The packed
    training forward keeps the copies: with grouped heads its key/value gradients add up in another
    order, and its copies are made once per forward, not once per token.)"""
    if device.type != "cpu" or _FORCE_GQA in os.environ:
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


def reserve_cache(cache, room: int) -> None:
    """Give every plain key/value layer of `cache` buffers with `room` more tokens (`_ReservedLayer`).
    Sliding-window, linear-attention and other layer kinds are left as they are."""
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[i] = _ReservedLayer(layer, room)


def decode_completions(family: Family, completions: Completions) -> list[str]:
    """Decode without skipping special tokens (the <think>/<answer> tags may be special), minus EOS/pad.
    Each text starts with what the generation prompt opened for it (`ChatTemplate.opened`, e.g. the
    "<think>\n" of a thinking template), so rewards read the whole reasoning block the model wrote."""
    strip = set(family.eos_ids) | {family.pad_id}
    return [
        family.template.opened
        + family.tokenizer.decode([t for t, m in zip(row, row_mask) if m and t not in strip], skip_special_tokens=False)
        for row, row_mask in zip(completions.ids.tolist(), completions.mask.tolist())
    ]
