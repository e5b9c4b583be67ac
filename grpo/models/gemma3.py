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
from .tiny_parts import ChatFormat, TinyModel, special_ids


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


FAMILY = Gemma3Family

# ---------------------------------------------------------------- tiny model (grpo/tiny.py)

# Gemma 3's chat template, reduced to image + text conversations: a system message is merged into the
# first user turn, the assistant speaks as "model", and an image is `<start_of_image>`, which the
# processor expands to the soft tokens between begin- and end-of-image.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ first_user_prefix if loop.first else '' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

GEMMA3_FORMAT = ChatFormat(
    special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                    "<end_of_image>", "<image_soft_token>"),
    pad_token="<pad>",
    eos_token="<eos>",
    bos_token="<bos>",
    end_of_turn=("<end_of_turn>", "<eos>"),
    chat_template=CHAT_TEMPLATE,
    # Not GemmaTokenizer: its loader rebuilds a SentencePiece-style pipeline around the saved vocabulary,
    # and a reloaded (save_pretrained / from_pretrained) byte-level BPE then fails to tokenize ("Unk token").
    tokenizer_class="PreTrainedTokenizerFast",
    named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
)

IMAGE_SIZE, TOKENS_PER_IMAGE = 56, 4  # SigLIP on 56x56 px (4x4 patches of 14), pooled to 2x2


def _tiny_gemma3(tokenizer, hidden_size, num_layers, min_pixels, max_pixels):
    # Plain 1-D positions (no get_rope_index). Gemma3Processor renames its mm_token_type_ids to
    # token_type_ids (1 on the soft image tokens), which switch on bidirectional attention inside each
    # image; it returns input_ids, attention_mask, token_type_ids, pixel_values. In transformers 5.24 a
    # forward over an image without token_type_ids runs (train mode too) but gives other logits: pass
    # them to every forward over a prompt, the completion's included (a forward continuing a cached
    # prompt needs none: `Gemma3Family.continuation_kwargs`). The processor wants one list of images per
    # prompt (a flat list is read as all images of one prompt) and expands each <start_of_image> to
    # "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n". The tokenizer must name boi_token /
    # eoi_token / image_token. Every image is resized to IMAGE_SIZE (min_pixels / max_pixels unused).
    # Layers alternate sliding (window 8) and full attention, so the window masks prompts of ~40 tokens.
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    heads = 4
    head_dim = hidden_size // heads
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            sliding_window=8, max_position_embeddings=4096,
            **special_ids(tokenizer, GEMMA3_FORMAT),
        ),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                           patch_size=14, vision_use_head=False),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=tokenizer.chat_template, image_seq_length=TOKENS_PER_IMAGE)
    return config, processor


TINY_MODELS = {"gemma3": TinyModel(GEMMA3_FORMAT, _tiny_gemma3)}
