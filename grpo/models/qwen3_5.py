"""Qwen3.5: natively multimodal, a Qwen3-VL-style vision tower and 3-D mRoPE, and a hybrid language
model whose `layer_types` mix linear attention (Gated DeltaNet) and full attention.

A linear-attention layer caches no keys and values but a recurrent state and a short convolution
state per sequence; transformers' cache layer for them cannot be repeated or indexed by batch
row, so this module does it: every state tensor is repeated / indexed like the keys and values of
the attention layers. For the shared-prefix training forward the indexed states must stay intact
until backward (the completion forward reads them and autograd keeps them), while the layer
writes its new state into the old tensor in place; after indexing, the layer's updates therefore
replace the state tensor instead of writing into it. Left padding is exact: the model zeroes the
hidden states of padding tokens, which leaves the states at zero.
"""

from __future__ import annotations

import types

from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

from .qwen2_vl import Qwen2VLFamily


def _replace_recurrent_state(layer, recurrent_states, state_idx: int = 0, **kwargs):
    layer.recurrent_states[state_idx] = recurrent_states
    return recurrent_states


class Qwen3_5Family(Qwen2VLFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    packs_groups = False  # a linear-attention layer's state would run from one packed completion into the next

    def repeat_cache(self, cache, repeats):
        for layer in cache.layers:
            _each_state(layer, lambda state: state.repeat_interleave(repeats, dim=0))
            if isinstance(layer, DynamicLayer):  # a hybrid layer is both kinds
                DynamicLayer.batch_repeat_interleave(layer, repeats)
            elif not isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.batch_repeat_interleave(repeats)

    def select_cache(self, cache, index):
        for layer in cache.layers:
            if _each_state(layer, lambda state: state[index]):
                layer.update_recurrent_state = types.MethodType(_replace_recurrent_state, layer)
            if isinstance(layer, DynamicLayer):
                DynamicLayer.batch_select_indices(layer, index)
            elif not isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.batch_select_indices(index)


def _each_state(layer, change) -> bool:
    """Apply `change` to every conv and recurrent state of a linear-attention cache layer; False for others."""
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        return False
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            layer.conv_states[i] = change(layer.conv_states[i])
        if layer.is_recurrent_states_initialized[i]:
            layer.recurrent_states[i] = change(layer.recurrent_states[i])
    return True
