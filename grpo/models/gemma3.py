"""Gemma 3 (MedGemma 4B is this): a SigLIP tower at a fixed resolution, a fixed number of soft tokens
per image between begin/end-of-image tokens, 1-D positions.

`token_type_ids` (1 on the image's soft tokens) switch on bidirectional attention inside each image,
so every forward over a prompt gets them (zeros over a completion). Forwards that continue a cached
prompt (decoding steps, the shared path's completion forward) get none: see `continuation_kwargs`.
Some layers use sliding-window attention; the window counts cache slots, which are contiguous for
left-padded prompts and their continuations, so the shared prompt cache is exact.
"""

from __future__ import annotations

from .pooled import PooledFeaturesFamily


class Gemma3Family(PooledFeaturesFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    token_type_key = "token_type_ids"

    def continuation_kwargs(self, input_ids):
        # No token_type_ids, as Hugging Face `generate` does after the prefill. A continuation holds no
        # image token, so its row (zeros) unmasks nothing and the mask is the plain causal / sliding one
        # either way; but with the row, transformers (5.24) builds both masks through its vmap path on
        # every forward: at paper-shape-small 13 to 17 ms of a 55 to 60 ms decoding step
        # (benchmarks/README.md, "Gemma 3 vs TRL").
        return {}
