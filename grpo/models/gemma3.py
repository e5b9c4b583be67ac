"""Gemma 3 (MedGemma 4B is this): a SigLIP tower at a fixed resolution, a fixed number of soft tokens
per image between begin/end-of-image tokens, 1-D positions.

`token_type_ids` (1 on the image's soft tokens) switch on bidirectional attention inside each image
and are required in training mode, so every forward gets them (zeros over a completion). Some
layers use sliding-window attention; the window counts cache slots, which are contiguous for
left-padded prompts and their continuations, so the shared prompt cache is exact.
"""

from __future__ import annotations

from .pooled import PooledFeaturesFamily


class Gemma3Family(PooledFeaturesFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    token_type_key = "token_type_ids"
