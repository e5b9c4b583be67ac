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

from .qwen2_vl import QWEN_FORMAT, Qwen2VLFamily, mrope_section, qwen_processor, qwen_token_ids
from .qwen3_vl import qwen3_vision
from .tiny_parts import TinyModel, special_ids


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


FAMILY = Qwen3_5Family

# ---------------------------------------------------------------- tiny model (grpo/tiny.py)


def _tiny_qwen3_5(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # Hybrid: layer_types alternate Gated DeltaNet ("linear_attention": conv + recurrent state in the cache,
    # a LinearAttentionLayer without batch_select_indices) and gated "full_attention" (every 4th layer in
    # the real models, every 2nd here). Rotary on a quarter of each head (partial_rotary_factor 0.25), so
    # mrope_section sums to head_dim / 8. Its processor is Qwen3VLProcessor (the auto mapping's choice;
    # returns mm_token_type_ids), its vision tower Qwen3-VL's without DeepStack. A saved processor
    # reloads with Qwen3_5Tokenizer (transformers forces that class for qwen3_5; same ids on our text).
    # Without causal_conv1d / flash-linear-attention the linear layers run pure-torch kernels (warned).
    from transformers import Qwen3_5Config, Qwen3VLProcessor, Qwen3VLVideoProcessor

    if num_layers < 2:
        raise ValueError(f"qwen3_5 needs num_layers >= 2 (a linear- and a full-attention layer), got {num_layers}")
    heads, head_dim, rotary_share = 4, 32, 0.25
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_share,
                             "mrope_section": mrope_section(int(head_dim * rotary_share), 5 / 16),
                             "mrope_interleaved": True},
            tie_word_embeddings=True,
            **special_ids(tokenizer, QWEN_FORMAT),
        ),
        vision_config=qwen3_vision(hidden_size),
        **qwen_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    return config, qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, min_pixels, max_pixels)


TINY_MODELS = {"qwen3_5": TinyModel(QWEN_FORMAT, _tiny_qwen3_5)}
