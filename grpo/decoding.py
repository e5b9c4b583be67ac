"""Decoding with static shapes, compiled once per run shape (`GRPOConfig.compile_decode`).

Eager decoding pays Python and kernel-launch overhead on every token step, more than the step's
arithmetic for a batch of a few dozen rows. `StaticDecoder` makes every step of a rollout the same
program: the prompt's keys and values are copied into a KV cache preallocated for the whole
completion (transformers' `StaticCache`, its length rounded up to a multiple of `bucket` so that
prompts of nearby lengths share it), all rows step together (finished rows keep stepping on
padding), and the attention mask keeps one shape: an [N, length] mask whose next column is set in
place, or, for a packing family (one row per prompt, its G tokens fed side by side: `grpo.sampling`),
the packed mask with the keys not yet written masked out. The
model's forward over one such step is then compiled once (`torch.compile`, CUDA graphs on a GPU:
mode "reduce-overhead") and replayed. Sampling stays outside, in `grpo.sampling`, unchanged.

The other layer kinds keep one shape too. A sliding-window layer (Gemma 3) gets a full-length
static layer: its prefilled window is written at the prompt's last slots, and transformers' sliding
mask, which counts cache slots, hides every key outside the window, as the eager cache's window
does. A linear-attention layer (Qwen3.5) keeps fixed-size conv and recurrent states that the model
updates in place: the prefilled layer itself goes into the static cache. Models under DeepSpeed, and
layer kinds beyond these, decode eagerly, said once on stderr.
"""

from __future__ import annotations

import sys

import torch
from transformers import StaticCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin, StaticLayer

from .models import Family, text_config, unwrap


def wants_compiled_decoding(setting, device: torch.device) -> bool:
    """`compile_decode` resolved: "auto" is on for CUDA (CUDA graphs) and off on the CPU, where
    compiling (8-16 s per cache length on 2 cores) buys a rollout only 1.1-1.5x (benchmarks/README.md)
    and a short run spends more on compiling than it saves."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    if not isinstance(setting, bool):
        raise ValueError(f"compile_decode must be 'auto', True or False, got {setting!r}")
    return setting


_STATIC_KINDS = {"full_attention", "sliding_attention", "linear_attention"}  # layer kinds `static_cache` can hold


class StaticDecoder:
    """Static-shape decoding for one run; keeps its compiled forward across rollouts."""

    def __init__(self, compile: bool = True, bucket: int = 64, mode: str | None = None, keep_caches: int = 8):
        self.compile = compile
        self.bucket = bucket
        self.mode = mode
        self.keep_caches = keep_caches  # static caches kept for reuse, one per (length, rows, dtype)
        self._caches: dict[tuple, StaticCache] = {}
        self._shapes: set[tuple] = set()  # (length, rows, dtype) decoded so far
        self._compiled = None  # (model, its compiled forward)
        self._told: set[str] = set()

    def why_not(self, family: Family, model) -> str | None:
        """Why `model` cannot decode here (then the caller decodes eagerly), or None."""
        if model is not unwrap(model) and hasattr(model, "module"):
            return "a DeepSpeed engine (its forward gathers parameters)"
        layer_types = getattr(text_config(unwrap(model).config), "layer_types", None) or ["full_attention"]
        other = sorted(set(layer_types) - _STATIC_KINDS)
        if other:
            return f"{family.name}'s {', '.join(other)} layers have no static cache here"
        return None

    def usable(self, family: Family, model) -> bool:
        reason = self.why_not(family, model)
        if reason and reason not in self._told:
            self._told.add(reason)
            print(f"[grpo] compile_decode: {reason}; decoding eagerly", file=sys.stderr)
        return reason is None

    def cache_length(self, prompt_length: int, new_tokens: int) -> int:
        """Slots of the static cache: prompt + completion, rounded up to the bucket."""
        return -(-(prompt_length + new_tokens) // self.bucket) * self.bucket

    def static_cache(self, model, cache, prompt_length: int, new_tokens: int) -> StaticCache:
        """A cache of `cache_length` slots holding `cache`'s prompt keys and values, written at slots
        0 .. prompt_length - 1, with `cache`'s rows (N: the prompts repeated for their G samples; B for
        packed decoding, one row per prompt). `new_tokens`: the tokens the decoding will feed per row.

        The cache of a shape is made once and refilled by later rollouts of that shape: a CUDA graph
        reads and writes its buffers at fixed addresses, and new buffers at every rollout would have
        the graph recorded again each time (and, past torch's limit on re-recordings, not replayed)."""
        length = self.cache_length(prompt_length, new_tokens)
        first = cache.layers[0]
        rows = (_states(first) if isinstance(first, LinearAttentionCacheLayerMixin) else [first.keys])[0].shape[0]
        key = (length, rows, unwrap(model).dtype)
        static = self._caches.pop(key, None)
        if self.compile and key not in self._shapes:  # a compilation (CUDA graphs: a recording) is coming: say so
            self._shapes.add(key)
            print(f"[grpo] compile_decode: compiling the decoding step for {rows} rows x {length} cache slots "
                  f"(once per shape)", file=sys.stderr, flush=True)
        if static is None:
            static = StaticCache(config=unwrap(model).config, max_cache_len=length)
            for i, prompt in enumerate(cache.layers):
                if isinstance(prompt, LinearAttentionCacheLayerMixin):  # fixed-size states, updated in place
                    for state in _states(prompt):  # repeated for the G samples: new tensors, their addresses fixed now
                        torch._dynamo.mark_static_address(state)
                    static.layers[i] = prompt
                else:  # sliding layers too, at full length: the mask keeps the window
                    static.layers[i] = StaticLayer(max_cache_len=length)
                    static.layers[i].lazy_initialization(prompt.keys, prompt.values)
        for layer, prompt in zip(static.layers, cache.layers):
            if isinstance(prompt, LinearAttentionCacheLayerMixin):
                if layer is not prompt:
                    for mine, new in zip(_states(layer), _states(prompt)):
                        mine.copy_(new)
                    layer.cumulative_length_linear.copy_(prompt.cumulative_length_linear)
                continue
            kept = prompt.keys.shape[-2]  # a sliding layer holds only its window's last keys
            for buffer, prefilled in ((layer.keys, prompt.keys), (layer.values, prompt.values)):
                buffer.zero_()  # what an earlier rollout left is masked, but a fresh cache is exactly today's
                buffer[..., prompt_length - kept: prompt_length, :] = prefilled
            layer.cumulative_length.fill_(prompt_length)
        self._caches[key] = static  # the most recently used last
        while len(self._caches) > self.keep_caches:
            self._caches.pop(next(iter(self._caches)))
        return static

    def forward(self, model):
        """The forward that runs a decoding step: compiled once per model (later calls with the same
        shapes replay it; a new bucket length compiles once more), else the model itself."""
        if not self.compile:
            return model
        if self._compiled is None or self._compiled[0] is not model:
            mode = self.mode or ("reduce-overhead" if next(unwrap(model).parameters()).is_cuda else None)
            # One graph per cache length and row count (training and evaluation batches, bucketed prompt
            # lengths): more than torch's default of 8 per function, past which it would decode eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled = (model, torch.compile(model, dynamic=False, mode=mode))
        return self._compiled[1]

    def step(self, model, **inputs):
        """One decoding forward. A model that fails to compile decodes eagerly from then on, said once."""
        forward = self.forward(model)
        if forward is model:
            return model(**inputs)
        try:
            return forward(**inputs)
        except Exception as error:  # torch.compile raises many types; the eager forward is the fallback
            self.compile = False
            print(f"[grpo] compile_decode: {type(unwrap(model)).__name__} did not compile ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200]}); decoding eagerly", file=sys.stderr)
            return model(**inputs)


def _states(layer) -> list[torch.Tensor]:
    """The conv and recurrent state tensors a linear-attention cache layer holds."""
    return [state for states in (layer.conv_states, layer.recurrent_states) for state in states.values()
            if state is not None]
