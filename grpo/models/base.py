"""What the trainer needs to know about a model, and the behaviour of a model of no known family.

`Family` is the whole interface between the algorithm (prompts, sampling, log-probs, the trainers)
and a model architecture:

  prompts     which processor output marks image tokens (`token_type_key`), passed back to every
              forward, zeros over the completion (`continuation_kwargs` for forwards continuing a
              cached prompt);
  positions   the position ids of a prompt (`positions`) and of the tokens that continue it
              (`continuation_positions`): 1-D, or 3-D mRoPE for the Qwen families;
  images      the image features computed once per step (`image_features`) and how a forward is
              handed them back (`features_kwargs`): families with `fast_path = True` only;
  KV cache    how a prompt's cache is repeated for G samples and indexed out to completions;
  tokens      end-of-turn ids (from the model's generation config and chat template, never a
              literal), the vision special tokens sampling must never emit;
  vision      the modules that make image features (frozen with `freeze_vision_tower`).

This base class is the plain path any Hugging Face model runs on: each completion forwarded with
its own copy of the prompt, the vision tower run by the model itself on the pixels, 1-D positions
from the attention mask (what `generate` uses for decoder-only models). A family module overrides
what its architecture does differently and sets `fast_path = True` once its shared-prompt path is
exact (tests/test_families.py checks both paths against the model's own forward).
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from ..templates import ChatTemplate

# Config attributes naming vision special tokens, across families (Qwen, Gemma 3, InternVL, LLaVA...).
_VISION_TOKEN_ATTRIBUTES = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index",
    "boi_token_id", "eoi_token_id", "boi_token_index", "eoi_token_index", "start_image_token_id", "end_image_token_id",
)
# Processor attributes holding vision special tokens as text.
_VISION_TOKEN_NAMES = ("image_token", "video_token", "boi_token", "eoi_token", "start_image_token", "end_image_token",
                       "vision_start_token", "vision_end_token")
# Attribute names of the modules that turn pixels into features, in the families transformers has.
_VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "mm_projector")
# Processor outputs that are the text side of a prompt, not its images.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
_MARKER = "zqxjv"  # a word no template adds: the text after it in a rendered turn is the end-of-turn


def unwrap(model):
    """The Hugging Face model inside a DeepSpeed engine (or any wrapper with `.module`) and inside a
    PEFT `PeftModel` (LoRA): what its config, classes and submodules are read from. Forwards still go
    through the wrappers, so LoRA adapters stay active."""
    model = getattr(model, "module", model)
    peft = sys.modules.get("peft")  # a model can only be a PeftModel once peft is imported
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def inner_model(model):
    """The multimodal base model (`model.model` of a `...ForConditionalGeneration`), or the model."""
    model = unwrap(model)
    return model.model if hasattr(model, "model") and hasattr(model.model, "get_image_features") else model


def text_config(config):
    """The language model's config (the config itself for a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """The forward's KV-cache argument: `cache` since transformers 5.24, `past_key_values` before (and
    still accepted, with a warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class Family:
    """A model of no known family: the plain path. Subclasses describe one architecture each."""

    name = "generic"
    model_types: tuple[str, ...] = ()  # the transformers `model_type`s this class serves
    fast_path = False  # vision once, prefill once and shared-prefix log-probs are exact
    # The shared-prefix log-probs as one forward over each prompt and all its completions, under a
    # custom mask (`logprobs.packed_logprobs`); `can_pack` also checks the model's layers.
    packs_groups = False
    token_type_key: str | None = None  # the processor's row marking image tokens, e.g. "mm_token_type_ids"
    position_rows = 0  # 0: 1-D position ids [B, L]; 3: mRoPE ids [3, B, L]
    extra_vision_tokens: tuple[str, ...] = ()  # vision special tokens the config and processor do not name
    # Why this model runs the plain path (generic models only); None for a family of our own.
    lacks: str | None = "no family module in grpo/models (cached image features, shared-prefix log-probs, its own positions)"

    def __init__(self, model, processor, chat_template_kwargs: dict | None = None):
        model = unwrap(model)
        self.config = model.config
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = ChatTemplate(processor, chat_template_kwargs)  # rows' messages -> prompt text, SFT targets
        self.end_of_turn_id = self._end_of_turn_id()
        self.eos_ids = self._eos_ids(model)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.forbidden_ids = self._vision_token_ids()
        # Cached image features go back through the forward's `mm_encoder_outputs` (transformers 5.18+).
        # An older forward takes the unknown keyword into **kwargs and ignores it: the image tokens
        # would then be read as plain token embeddings, silently. There, forwards take the pixels.
        self.caches_features = self.fast_path and "mm_encoder_outputs" in inspect.signature(type(model).forward).parameters

    # ------------------------------------------------------------------ tokens
    def _end_of_turn_id(self) -> int | None:
        """The token closing an assistant turn, read from the chat template: the first token after
        the turn's text. None when there is no template or it closes turns with plain text."""
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}], tokenize=False)
        except Exception:
            return None
        if _MARKER not in text:
            return None
        after = text[text.index(_MARKER) + len(_MARKER):]
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        return ids[0] if ids and ids[0] in special else None

    def _eos_ids(self, model) -> list[int]:
        """Ids that end a completion: the generation config's EOS, the template's end of turn, the
        tokenizer's EOS."""
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids])
        ids |= {self.end_of_turn_id, self.tokenizer.eos_token_id}
        ids.discard(None)
        if not ids:
            raise ValueError(f"{type(model).__name__}: no end-of-sequence token in the generation config, the chat "
                             f"template or the tokenizer; set model.generation_config.eos_token_id")
        return sorted(ids)

    def _vision_token_ids(self) -> list[int]:
        """Vision special tokens: sampled and fed back they break the image-token count, so sampling
        never emits them."""
        ids = set()
        for config in (self.config, text_config(self.config)):
            ids |= {getattr(config, name, None) for name in _VISION_TOKEN_ATTRIBUTES}
        vocab = self.tokenizer.get_vocab()
        names = [getattr(self.processor, name, None) for name in _VISION_TOKEN_NAMES] + list(self.extra_vision_tokens)
        ids |= {vocab.get(name) for name in names if isinstance(name, str)}
        ids.discard(None)
        return sorted(i for i in ids if isinstance(i, int) and 0 <= i < len(vocab))

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str, images: list) -> dict:
        """The processor's tensors for one rendered prompt and its images (batch dimension 1), special
        tokens added as `apply_chat_template(tokenize=True)` adds them (one `<bos>` on Gemma)."""
        special = self.template.add_special_tokens(text)
        if images:
            return dict(self.processor(text=[text], images=images, add_special_tokens=special, return_tensors="pt"))
        if self.processor is self.tokenizer:
            return dict(self.tokenizer([text], add_special_tokens=special, return_tensors="pt"))
        return dict(self.processor(text=[text], add_special_tokens=special, return_tensors="pt"))

    def image_token_row(self, encoded: dict) -> torch.Tensor:
        """[1, P] 1 on the prompt's image tokens: the processor's `token_type_key` output, else the
        positions of the config's image token."""
        if self.token_type_key and self.token_type_key in encoded:
            return encoded[self.token_type_key].long()
        image_token = getattr(self.config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(self.config, "image_token_index", None)
        return (encoded["input_ids"] == image_token).long() if image_token is not None else torch.zeros_like(encoded["input_ids"])

    def forward_kwargs(self, token_types: torch.Tensor) -> dict:
        """The image-token row a forward needs (`token_type_key`), when the family has one."""
        return {self.token_type_key: token_types} if self.token_type_key else {}

    def continuation_kwargs(self, input_ids: torch.Tensor) -> dict:
        """`forward_kwargs` for tokens continuing a cached prompt (decoding steps, the shared path's
        completion forward): completion tokens are never image tokens, so their row is all zeros."""
        return self.forward_kwargs(torch.zeros_like(input_ids))

    # ------------------------------------------------------------------ positions
    def positions(self, model, input_ids, token_types, image_inputs: dict, attention_mask) -> torch.Tensor:
        """Position ids of left-padded sequences: 0, 1, ... from the first real token."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def next_position(self, positions: torch.Tensor) -> torch.Tensor:
        """[B] the position of the first token continuing each sequence."""
        return (positions.amax(dim=-1) if positions.dim() == 2 else positions.amax(dim=(0, 2))) + 1

    def continuation_positions(self, start: torch.Tensor, length: int) -> torch.Tensor:
        """Positions of `length` tokens continuing sequences whose next position is `start` [N]."""
        positions = start[:, None] + torch.arange(length, device=start.device)[None]  # [N, length]
        return positions.unsqueeze(0).expand(self.position_rows, -1, -1) if self.position_rows else positions

    # ------------------------------------------------------------------ images
    def image_features(self, model, image_inputs: dict, prompts) -> list[tuple[torch.Tensor, ...]]:
        """Per prompt with images, the features its forward needs (fast-path families only)."""
        raise NotImplementedError(f"{self.name}: no cached image features (plain path)")

    def features_kwargs(self, features: list[tuple[torch.Tensor, ...]]) -> dict:
        """Forward kwargs handing cached features (per prompt, in order) back to the model."""
        raise NotImplementedError(f"{self.name}: no cached image features (plain path)")

    def vision_modules(self, model) -> list[torch.nn.Module]:
        """The modules that turn pixels into the features the language model reads."""
        inner = inner_model(model)
        return [getattr(inner, name) for name in _VISION_MODULES if isinstance(getattr(inner, name, None), torch.nn.Module)]

    @staticmethod
    def image_token_pixels(processor) -> int | None:
        """The side in pixels of the square one visual token covers, when the processor cuts images at
        their own size into such squares: the data loaders size images to multiples of it, within a
        budget of visual tokens (data/images.py). None (here): the processor sizes images its own way
        (a fixed square, tiles, or unknown), so they reach it unresized."""
        return None

    # ------------------------------------------------------------------ packed groups
    def attention_implementation(self, model) -> str | None:
        return getattr(text_config(unwrap(model).config), "_attn_implementation", None)

    def can_pack(self, model) -> bool:
        """Whether `packed_logprobs` is exact for `model`: a family that allows it, every language-model
        layer attending fully (no sliding window, no linear attention: their state runs along the
        sequence, across the packed completions), and an attention that takes a 4-D mask."""
        if not self.packs_groups:
            return False
        config = text_config(unwrap(model).config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        return (all(kind == "full_attention" for kind in layer_types) and not getattr(config, "use_sliding_window", False)
                and self.attention_implementation(model) in ("sdpa", "eager"))

    # ------------------------------------------------------------------ KV cache
    def cache_kwargs(self, model, cache) -> dict:
        """Forward kwargs that hand `cache` to `model` (a DeepSpeed engine is looked through)."""
        return {_cache_argument(type(unwrap(model))): cache, "use_cache": True}

    @staticmethod
    def cache_of(out):
        """The KV cache a forward returned, under either name."""
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def repeat_cache(self, cache, repeats: int) -> None:
        """Each prompt's cache repeated for its G samples, in place."""
        cache.batch_repeat_interleave(repeats)

    def select_cache(self, cache, index: torch.Tensor) -> None:
        """Rows `index` of the cache (repeats allowed), as an autograd-tracked copy, so the gradients
        of every completion continuing a prompt add up in that prompt's forward."""
        cache.batch_select_indices(index)
