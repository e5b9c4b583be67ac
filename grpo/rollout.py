"""Prompt encoding, sampling of G completions per prompt, and completion log-probs.

Everything the trainer, SFT and evaluation do with the model goes through three functions here:
`encode_prompts` (rows -> left-padded processor inputs), `generate` (the rollout: prefill once per
prompt, KV cache repeated G times, a sampling loop that stops at EOS) and `group_logprobs`
(log-probs of the completions of a group of prompts, gathered on the completion tokens only).

A GRPO group shares one prompt (and image) across its G completions, so the work that depends on the
prompt only is done once (SPEC 5): `with_image_features` runs the frozen vision tower once per image
per step and the rollout and every later forward reuse the features; `shared_prefix_logprobs`
forwards each prompt once and lets its G completions attend to the prompt's KV cache, gradients
flowing back into the shared prompt once. `completion_logprobs` is the plain path (one forward over
prompt + completion per completion) that the shared one is tested against.

Qwen2.5-VL positions are 3-D (mRoPE) and depend on the image grid; we always compute them with the
model's own `get_rope_index` over the prompt (plus the completion, as text) and pass them explicitly,
so the rollout and every training forward use identical positions (SPEC 5).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .distributed import any_rank

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


def load_image(value, row_index: int, field: str = "image") -> Image.Image:
    """A row's image as RGB: a PIL image, a path, or a lazy image. Errors name the row and the field.

    A lazy image is any object with an `open_image()` method returning a PIL image (for instance
    `data.images.LazyImage`, which also resizes to a pixel budget); it is opened only here, per batch.
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if callable(getattr(value, "open_image", None)):
        try:
            return value.open_image().convert("RGB")
        except Exception as error:
            raise ValueError(f"row {row_index}: field {field!r}: cannot open image {value!r}: {error}") from error
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        try:
            with Image.open(value) as image:
                return image.convert("RGB")
        except Exception as error:  # PIL raises several types for unreadable files
            raise ValueError(f"row {row_index}: field {field!r}: cannot read image {value!r}: {error}") from error
    raise ValueError(f"row {row_index}: field {field!r}: expected a PIL image or a path, got {type(value).__name__}")


def row_images(row: dict, row_index: int) -> list[Image.Image]:
    """The images of a row: `image` (one) or `images` (a list); none for a text-only row."""
    if row.get("images") is not None:
        return [load_image(value, row_index, "images") for value in row["images"]]
    if row.get("image") is not None:
        return [load_image(row["image"], row_index)]
    return []


@dataclass
class PromptBatch:
    """Left-padded processor inputs for B prompts."""

    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    mm_token_type_ids: torch.Tensor  # [B, P] 1 on image tokens
    pixel_values: torch.Tensor | None  # [sum of patches, D]
    image_grid_thw: torch.Tensor | None  # [num_images, 3]
    images_per_prompt: list[int]
    # Vision-tower output per image ([merged tokens, hidden] each), set by `with_image_features`;
    # when present, forwards use it instead of running the vision tower on `pixel_values` again.
    image_features: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: list[int]) -> PromptBatch:
        """The prompts at `index` (repeats allowed), with their images' patches, left padding trimmed."""
        pixel_values = grid = features = None
        if self.image_grid_thw is not None:
            patches = self.image_grid_thw.prod(-1).tolist()
            image_start = [0]
            for count in self.images_per_prompt:
                image_start.append(image_start[-1] + count)
            patch_start = [0]
            for count in patches:
                patch_start.append(patch_start[-1] + count)
            images = [j for i in index for j in range(image_start[i], image_start[i + 1])]
            if images:
                grid = self.image_grid_thw[images]
                pixel_values = torch.cat([self.pixel_values[patch_start[j] : patch_start[j + 1]] for j in images])
                if self.image_features is not None:
                    features = tuple(self.image_features[j] for j in images)
        attention_mask = self.attention_mask[index]
        first = int((attention_mask.cumsum(1) == 0).sum(1).min())  # columns that are padding everywhere
        return PromptBatch(
            input_ids=self.input_ids[index, first:],
            attention_mask=attention_mask[:, first:],
            mm_token_type_ids=self.mm_token_type_ids[index, first:],
            pixel_values=pixel_values,
            image_grid_thw=grid,
            images_per_prompt=[self.images_per_prompt[i] for i in index],
            image_features=features,
        )

    def to(self, device) -> PromptBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(
            move(self.input_ids), move(self.attention_mask), move(self.mm_token_type_ids),
            move(self.pixel_values), move(self.image_grid_thw), self.images_per_prompt,
            None if self.image_features is None else tuple(move(f) for f in self.image_features),
        )

    def without_features(self) -> PromptBatch:
        """The same prompts, forwarded from pixels (the vision tower runs again, with gradient if trainable)."""
        return replace(self, image_features=None)


def _image_parts(messages) -> int:
    """How many image parts chat messages hold (each needs one image from the row): the parts the
    Qwen-VL chat templates render as an image, `{"type": "image"}`, `"image_url"`, or any part with
    an `image` / `image_url` key."""
    return sum(
        1 for message in messages if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and (part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part)
    )


def encode_prompts(processor, rows: list[dict], row_indices: list[int], max_prompt_length: int) -> PromptBatch:
    """Render each row's `prompt` (chat messages) with the chat template and run the processor.

    A prompt longer than `max_prompt_length` tokens raises ValueError naming the row: cutting it
    would cut image tokens, so it is the data that must change (fewer pixels, a shorter question).
    """
    texts, images, counts = [], [], []
    for row, index in zip(rows, row_indices):
        if not row.get("prompt"):
            raise ValueError(f"row {index}: missing field 'prompt' (chat messages)")
        texts.append(processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True))
        row_imgs = row_images(row, index)
        expected = _image_parts(row["prompt"])
        if expected != len(row_imgs):
            raise ValueError(f"row {index}: the prompt has {expected} image part(s) but the row's field 'image' / 'images' "
                             f"gives {len(row_imgs)} image(s)")
        images.extend(row_imgs)
        counts.append(len(row_imgs))
    encoded = processor(
        text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
    )
    lengths = encoded["attention_mask"].sum(1)
    for length, index in zip(lengths.tolist(), row_indices):
        if length > max_prompt_length:
            raise ValueError(f"row {index}: prompt is {length} tokens, more than max_prompt_length={max_prompt_length}")
    mm = encoded.get("mm_token_type_ids")
    if mm is None:
        image_token = getattr(processor, "image_token", "<|image_pad|>")
        mm = (encoded["input_ids"] == processor.tokenizer.convert_tokens_to_ids(image_token)).long()
    return PromptBatch(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        mm_token_type_ids=mm,
        pixel_values=encoded.get("pixel_values"),
        image_grid_thw=encoded.get("image_grid_thw"),
        images_per_prompt=counts,
    )


def _inner(model):
    """The multimodal base model (the one with `get_rope_index` and `get_image_features`)."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "get_rope_index") else model


def _positions(model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
    """3-D mRoPE positions [3, B, L] as the model computes them for a full sequence."""
    positions, _ = _inner(model).get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    return positions


@torch.no_grad()
def with_image_features(model, prompts: PromptBatch) -> PromptBatch:
    """`prompts` with each image's vision features computed once by `model` (no gradient).

    Only valid where the features need no gradient: a frozen vision tower, or forwards without
    gradient (rollout, old-policy and reference log-probs).
    """
    if prompts.pixel_values is None:
        return prompts
    features = _inner(model).get_image_features(prompts.pixel_values, prompts.image_grid_thw, return_dict=True).pooler_output
    return replace(prompts, image_features=tuple(features))


def _vision_inputs(prompts: PromptBatch) -> dict:
    """Model kwargs for the prompts' images: cached features when present, else pixels."""
    if prompts.image_features is not None:
        # A fresh dict per call: the model fills in missing modalities of the one it is given.
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=prompts.image_features)}}
    return {"pixel_values": prompts.pixel_values, "image_grid_thw": prompts.image_grid_thw}


def vision_towers_equal(model, other) -> bool:
    """Whether two models' vision towers hold the same weights (then they may share image features)."""
    a, b = getattr(_inner(model), "visual", None), getattr(_inner(other), "visual", None)
    if a is None or b is None:
        return False
    if a is b:
        return True
    if any(hasattr(p, "ds_id") for p in a.parameters()):
        return False  # ZeRO-3 partitions: the local tensors are placeholders, not the weights
    theirs = dict(b.named_parameters())
    return all(name in theirs and torch.equal(p, theirs[name]) for name, p in a.named_parameters())


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """The forward's KV-cache argument: `cache` since transformers 5.24, `past_key_values` before (and
    still accepted, with a warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _with_cache(model, cache) -> dict:
    """Forward kwargs that hand `cache` to `model` (a DeepSpeed engine is looked through)."""
    return {_cache_argument(type(getattr(model, "module", model))): cache, "use_cache": True}


def _cache_of(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _prefill(model, prompts: PromptBatch):
    """One forward over the prompts keeping their KV cache and last logits; also their positions."""
    positions = _positions(model, prompts.input_ids, prompts.mm_token_type_ids, prompts.image_grid_thw, prompts.attention_mask)
    out = model(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **_vision_inputs(prompts),
    )
    return out, positions


def forbidden_token_ids(tokenizer) -> list[int]:
    """Vision special tokens: sampled and fed back, they break the image-token count (SPEC 5)."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in VISION_TOKENS if token in vocab]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """One token per row from [N, V] logits; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Completions:
    """G sampled completions per prompt, prompt-major: completion i belongs to prompt i // G."""

    ids: torch.Tensor  # [B*G, C] pad after EOS
    mask: torch.Tensor  # [B*G, C] 1 up to and including EOS
    truncated: torch.Tensor  # [B*G] bool: no EOS within max_new_tokens


@torch.no_grad()
def generate(
    model,
    prompts: PromptBatch,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    forbidden_ids: list[int] = (),
    generator: torch.Generator | None = None,
    synced: bool = False,
) -> Completions:
    """Sample `group_size` completions per prompt with a KV cache (temperature 0: greedy).

    Each prompt is prefilled once (vision tower and prompt tokens run once; not at all for the
    vision tower when `prompts` carries cached image features), then its cache is repeated G times
    for decoding. `synced` (needed under DeepSpeed ZeRO-3, where every forward gathers parameters
    collectively) keeps all processes decoding until the last one is done, so a process whose
    completions end early does not leave the others hanging.
    """
    device = prompts.input_ids.device
    out, positions = _prefill(model, prompts)
    cache = _cache_of(out)
    cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].float().repeat_interleave(group_size, 0)  # [N, V]
    attention_mask = prompts.attention_mask.repeat_interleave(group_size, 0)
    next_position = (positions.amax(dim=(0, 2)) + 1).repeat_interleave(group_size, 0)  # [N]
    n = logits.shape[0]
    eos = torch.tensor(list(eos_token_ids), device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        if len(forbidden_ids):
            logits[:, list(forbidden_ids)] = float("-inf")
        token = _sample(logits, temperature, top_p, top_k, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        finished = finished | torch.isin(token, eos)
        done = bool(finished.all())
        if synced:
            done = not any_rank(not done, device)
        if done or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position = (next_position + step).view(1, n, 1).expand(3, n, 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=position,
            **_with_cache(model, cache),
        )
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
    ids = torch.stack(tokens, dim=1)  # [N, C]
    is_eos = torch.isin(ids, eos)
    ended = is_eos.any(1)
    # 1 on every token up to and including the first EOS (all tokens when there is none).
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return Completions(ids=ids, mask=mask.long(), truncated=~ended)


def completion_logprobs(
    model, prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs [N, C] (fp32) of each completion token, from one forward over prompt + completion.

    `prompts` holds one prompt per completion (use `PromptBatch.select`). Logits are divided by the
    sampling temperature; only the chosen tokens' log-probs are gathered, row by row, so no
    [N, C, V] fp32 tensor is built.
    """
    input_ids = torch.cat([prompts.input_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], dim=1)
    mm_token_type_ids = torch.cat([prompts.mm_token_type_ids, torch.zeros_like(completion_ids)], dim=1)
    positions = _positions(model, input_ids, mm_token_type_ids, prompts.image_grid_thw, attention_mask)
    length = completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=False,
        logits_to_keep=length + 1,
        **_vision_inputs(prompts),
    )
    # The logits at position t predict completion token t.
    return _gather_logprobs(out.logits[:, :-1], completion_ids, temperature)


def _gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at `ids`, [N, C] fp32, one row at a time (no [N, C, V] fp32 tensor)."""
    rows = []
    for row_logits, row_ids in zip(logits, ids):
        row_logits = row_logits.float() / temperature
        chosen = row_logits.gather(-1, row_ids[:, None]).squeeze(-1)
        rows.append(chosen - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def shared_prefix_logprobs(
    model, prompts: PromptBatch, prompt_index: list[int], completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, temperature: float = 1.0,
) -> torch.Tensor:
    """`completion_logprobs` with each prompt forwarded once for all the completions that continue it.

    `prompts` holds the distinct prompts; completion i continues prompt `prompt_index[i]`. The prompt
    forward keeps its KV cache, which is indexed out to the completions (an autograd-tracked copy, so
    the completions' gradients add up in the shared prompt); the completion forward attends to it
    with the rollout's positions (prompt's largest mRoPE position + 1 onwards). The last completion
    token is never fed: nothing it predicts is scored.
    """
    device = completion_ids.device
    out, positions = _prefill(model, prompts)
    rep = torch.as_tensor(prompt_index, device=device)
    first = _gather_logprobs(out.logits[rep], completion_ids[:, :1], temperature)  # [N, 1]
    length = completion_ids.shape[1]
    if length == 1:
        return first
    cache = _cache_of(out)
    cache.batch_select_indices(rep)  # rebinds each layer's keys/values to an indexed copy: differentiable
    attention_mask = torch.cat([prompts.attention_mask[rep], completion_mask[:, :-1].to(prompts.attention_mask.dtype)], dim=1)
    start = positions.amax(dim=(0, 2))[rep] + 1  # [N]
    steps = torch.arange(length - 1, device=device)
    completion_positions = (start[:, None] + steps[None]).unsqueeze(0).expand(3, -1, -1)
    out = model(
        input_ids=completion_ids[:, :-1],
        attention_mask=attention_mask,
        position_ids=completion_positions,
        **_with_cache(model, cache),
    )
    rest = _gather_logprobs(out.logits, completion_ids[:, 1:], temperature)  # [N, C - 1]
    return torch.cat([first, rest], dim=1)


def group_logprobs(
    model, prompts: PromptBatch, prompt_index: list[int], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
    temperature: float = 1.0, shared_prefix: bool = True,
) -> torch.Tensor:
    """Log-probs [N, C] of completions under `model`; completion i continues prompt `prompt_index[i]`.

    The trainer's one entry point for policy, old-policy and reference log-probs. `shared_prefix`
    picks `shared_prefix_logprobs`; the plain path (`completion_logprobs`, one prompt copy per
    completion) is used when it is off and under gradient checkpointing, which turns the KV cache off.
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    name = "is_activation_checkpointing" if hasattr(type(module), "is_activation_checkpointing") else "is_gradient_checkpointing"
    checkpointing = bool(getattr(module, name, False)) and module.training
    if shared_prefix and not checkpointing:
        return shared_prefix_logprobs(model, prompts, prompt_index, completion_ids, completion_mask, temperature)
    return completion_logprobs(model, prompts.select(list(prompt_index)), completion_ids, completion_mask, temperature)
