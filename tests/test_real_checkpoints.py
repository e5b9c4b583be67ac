"""The library on real checkpoints' own processor files: Qwen2.5-VL-3B, Gemma 3 4B (MedGemma 4B's
tokenizer and template) and Qwen3.5-0.8B, each with a small random-weight model of its real config,
loaded by path as a user's checkpoint is (tests/real_checkpoints.py).

- Prompts: `encode_prompts` gives the ids and image tensors that `processor.apply_chat_template(...,
  tokenize=True)` documents, for images of several sizes, two images, no image, with and without a
  system message.
- Log-probs: on both paths, equal to one plain forward over that encoding followed by the completion,
  for one batch mixing image sizes, two images and no image (where other trainers crash in
  `get_rope_index` or shift a prompt's tokens silently).
- Rollouts: stop at the template's end of turn, never sample a vision token.

Models run in float32, as a user's would; log-probs must agree to 1e-4, where marking no image token
moves them by 0.1 nats or more (checked here). `pytest -s` prints one line per checkpoint:
`REAL <folder>: prompt ids equal=..., max |logprob diff| shared=... plain=...`.
"""

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image
from real_checkpoints import FOLDERS, real_processors_root
from transformers import AutoConfig, AutoProcessor

from grpo import GRPOConfig, Trainer
from grpo.logprobs import group_logprobs, with_image_features
from grpo.models import Family, family_for
from grpo.models.base import TEXT_KEYS
from grpo.prompts import encode_prompts
from grpo.loading import load_model

ATOL = 1e-4
END_OF_TURN = {"qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>", "qwen3_5": "<|im_end|>"}
VISION_TOKENS = {
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "qwen3_5": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"],
}
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are an expert pathology assistant."}]}


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def user_turn(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def rows():
    """Dataset rows (the library's format: `prompt` messages with `{"type": "image"}` parts, the images
    in `image` / `images`), by case."""
    question = "Which tissue is shown? Answer inside <answer> </answer>."
    return {
        "224x224, system": {"prompt": [SYSTEM, user_turn(question, 1)], "image": noise_image(224, 224, 0)},
        "300x180": {"prompt": [user_turn("Describe the stroma.", 1)], "image": noise_image(300, 180, 1)},
        "512x384, system": {"prompt": [SYSTEM, user_turn(question, 1)], "images": [noise_image(512, 384, 2)]},
        "two images, system": {"prompt": [SYSTEM, user_turn("Compare the two tiles.", 2)],
                               "images": [noise_image(512, 384, 3), noise_image(300, 180, 4)]},
        "text only, system": {"prompt": [SYSTEM, {"role": "user", "content": "Is necrosis a sign of malignancy?"}]},
        "text only": {"prompt": [user_turn("Name one stain used in histology.")]},
    }


@pytest.fixture(scope="module", params=FOLDERS)
def real(request, real_checkpoint):
    """(folder, model directory, model, processor, family), all loaded from the directory by path."""
    path = real_checkpoint(request.param)
    model = load_model(str(path)).eval()
    processor = AutoProcessor.from_pretrained(path)
    return request.param, path, model, processor, family_for(model, processor, quiet=True)


def row_images(row: dict) -> list:
    return row["images"] if "images" in row else [row["image"]] if "image" in row else []


def documented_encoding(processor, row: dict) -> dict:
    """The prompt as transformers documents it: the row's images placed in its messages' image parts
    ({"type": "image", "image": PIL image}), rendered and tokenized by `processor.apply_chat_template`."""
    messages, images = copy.deepcopy(row["prompt"]), iter(row_images(row))
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image":
                part["image"] = next(images)
    return dict(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt"))


def first_difference(tokenizer, ours: list[int], expected: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
    tokens = tokenizer.convert_ids_to_tokens
    return (f"{len(ours)} ids vs {len(expected)}; from id {at}: ours {tokens(ours[at:at + 4])}, "
            f"documented {tokens(expected[at:at + 4])}")


def reference_logprobs(model, encoding: dict, ids: list[int], token_type_key: str | None) -> torch.Tensor:
    """log p(completion token t) from ONE plain forward over the unpadded documented prompt encoding
    followed by the completion; the model computes its own positions."""
    completion = torch.tensor([ids])
    inputs = dict(encoding)
    inputs["input_ids"] = torch.cat([encoding["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if token_type_key:
        inputs[token_type_key] = torch.cat([encoding[token_type_key], torch.zeros_like(completion)], dim=1)
    logits = model(**inputs, logits_to_keep=len(ids) + 1).logits[0, :-1]  # position t predicts token t + 1
    return logits.float().log_softmax(-1).gather(-1, completion[0][:, None]).squeeze(-1)


def test_the_shrunk_models_keep_the_real_ids_sizes_and_layer_pattern(real):
    folder, path, model, processor, family = real
    ours, theirs = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(real_processors_root() / folder)
    for config_of in (lambda c: c, lambda c: c.get_text_config()):
        a, b = config_of(ours).to_dict(), config_of(theirs).to_dict()
        ids = [k for k in b if k.endswith(("_token_id", "_token_index")) or k in ("vocab_size", "mm_tokens_per_image")]
        assert {k: a.get(k) for k in ids} == {k: b[k] for k in ids}, folder
    sizes = ("patch_size", "spatial_merge_size", "temporal_patch_size", "image_size")
    assert ({k: getattr(ours.vision_config, k, None) for k in sizes}
            == {k: getattr(theirs.vision_config, k, None) for k in sizes}), folder
    text, real_text = ours.get_text_config(), theirs.get_text_config()
    assert text.hidden_size == 64 and text.num_hidden_layers < real_text.num_hidden_layers
    layers = text.layer_types  # one period of the real pattern: every kind of layer, in the real order
    assert layers == real_text.layer_types[: len(layers)] and set(layers) == set(real_text.layer_types), folder
    rope = text.rope_parameters
    if "mrope_section" in rope:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(rope["mrope_section"]) == int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    generation_config = "generation_config.json"  # Qwen3.5-0.8B published none
    assert (path / generation_config).exists() == (real_processors_root() / folder / generation_config).exists()
    assert len(processor.tokenizer) > 150_000 and model.dtype == torch.float32


def test_prompts_equal_apply_chat_templates_documented_encoding(real, rows):
    """Ids (left padding removed), image-token row and image tensors of every case, in one batch."""
    folder, path, model, processor, family = real
    prompts = encode_prompts(family, list(rows.values()), list(range(len(rows))), max_prompt_length=4096)
    image_tokens = {}
    for i, (case, row) in enumerate(rows.items()):
        expected = documented_encoding(processor, row)
        kept = prompts.attention_mask[i].bool()
        ours, documented = prompts.input_ids[i][kept].tolist(), expected["input_ids"][0].tolist()
        assert ours == documented, f"{folder}, {case}: {first_difference(processor.tokenizer, ours, documented)}"
        assert prompts.token_types[i][kept].tolist() == expected[family.token_type_key][0].tolist(), f"{folder}, {case}"
        image_keys = {key for key in expected if key not in TEXT_KEYS}
        assert prompts.image_inputs[i].keys() == image_keys and bool(image_keys) == bool(row_images(row)), case
        for key in image_keys:
            assert torch.equal(prompts.image_inputs[i][key], expected[key]), f"{folder}, {case}: {key}"
        image_tokens[case] = int(prompts.token_types[i].sum())
    one_image = [image_tokens[case] for case in ("224x224, system", "300x180", "512x384, system")]
    if folder == "gemma3":  # every image is resized to 896 x 896: 256 soft tokens whatever its size
        assert one_image == [256] * 3 and image_tokens["two images, system"] == 512
    else:  # the Qwen processors cut each image at its own size
        assert len(set(one_image)) == 3, one_image
    assert image_tokens["text only"] == image_tokens["text only, system"] == 0


def test_completion_logprobs_on_both_paths_equal_one_plain_forward(real, rows, monkeypatch):
    """One batch of prompts with images of different sizes, two images, and none; G = 2 ragged
    completions each. Shared path: with the prompts' pixels, with their cached image features (the
    trainer's no-gradient passes), and through the prompt's KV cache where the family would pack."""
    folder, path, model, processor, family = real
    chosen = [rows[case] for case in ("224x224, system", "300x180", "two images, system", "text only")]
    prompts = encode_prompts(family, chosen, list(range(len(chosen))), max_prompt_length=4096)
    expected = [documented_encoding(processor, row) for row in chosen]
    ids_equal = all(prompts.input_ids[b][prompts.attention_mask[b].bool()].tolist() == e["input_ids"][0].tolist()
                    for b, e in enumerate(expected))

    G, C = 2, 6
    prompt_index = [b for b in range(len(chosen)) for _ in range(G)]
    ids = torch.randint(1000, 100_000, (len(prompt_index), C), generator=torch.Generator().manual_seed(0))
    special = set(family.eos_ids) | set(family.forbidden_ids) | set(processor.tokenizer.all_special_ids)
    assert not special & set(ids.flatten().tolist()), "completion ids must be plain text tokens"
    mask = torch.ones_like(ids)
    mask[::2, 3:] = 0  # every prompt's first completion ends after 3 tokens
    ids = ids.masked_fill(mask == 0, family.pad_id)

    with torch.no_grad():
        ours = {
            "plain": group_logprobs(family, model, prompts, prompt_index, ids, mask, shared_prefix=False),
            "shared": group_logprobs(family, model, prompts, prompt_index, ids, mask, shared_prefix=True),
            "shared, cached image features": group_logprobs(family, model, with_image_features(family, model, prompts),
                                                            prompt_index, ids, mask, shared_prefix=True),
        }
        if family.can_pack(model):  # "shared" ran packed: the KV-cache route too
            monkeypatch.setattr(Family, "can_pack", lambda self, model: False)
            ours["shared, KV cache"] = group_logprobs(family, model, prompts, prompt_index, ids, mask)
        references = [reference_logprobs(model, expected[b], ids[i, : int(mask[i].sum())].tolist(),
                                         family.token_type_key) for i, b in enumerate(prompt_index)]
        # What the tolerance resolves: the two-image prompt with no token marked as an image's.
        unmarked = dict(expected[2], **{family.token_type_key: torch.zeros_like(expected[2][family.token_type_key])})
        probe = prompt_index.index(2)  # the two-image prompt's first completion
        unmarked_logprobs = reference_logprobs(model, unmarked, ids[probe, : len(references[probe])].tolist(),
                                               family.token_type_key)

    diff = {name: max(float((logprobs[i, : len(ref)] - ref).abs().max()) for i, ref in enumerate(references))
            for name, logprobs in ours.items()}
    shared = max(value for name, value in diff.items() if name != "plain")
    print(f"\nREAL {folder}: prompt ids equal={ids_equal}, "
          f"max |logprob diff| shared={shared:.2e} plain={diff['plain']:.2e}")
    assert ids_equal, f"{folder}: the prompts are not encoded as apply_chat_template documents"
    assert all(value <= ATOL for value in diff.values()), f"{folder}: {diff}"
    assert float((unmarked_logprobs - references[probe]).abs().max()) > 100 * ATOL


def test_rollouts_stop_at_the_real_end_of_turn_and_never_sample_vision_tokens(real, rows, tmp_path):
    """A Trainer given the directory by path, as a user's; the vision tokens made the likeliest."""
    folder, path, *_ = real
    chosen = [rows[case] for case in ("224x224, system", "300x180", "two images, system", "text only")]
    cfg = GRPOConfig(output_dir=str(tmp_path), group_size=2, prompts_per_step=4, completions_per_micro_batch=8,
                     max_completion_length=8, beta=0.0, max_steps=1, save_steps=0)
    trainer = Trainer(str(path), None, [lambda prompts, completions, **columns: [0.0] * len(completions)], chosen, cfg)
    family, tokenizer = trainer.family, trainer.processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[folder])
    assert family.end_of_turn_id == end_of_turn and end_of_turn in family.eos_ids
    assert set(tokenizer.convert_tokens_to_ids(VISION_TOKENS[folder])) <= set(family.forbidden_ids)
    if folder == "qwen3_5":  # no generation_config.json: the model's EOS is <|endoftext|>; <|im_end|> is the template's
        assert trainer.model.generation_config.eos_token_id != end_of_turn

    vocab = trainer.model.config.get_text_config().vocab_size
    boost = torch.zeros(vocab)
    boost[family.forbidden_ids] = 100.0
    # End of turn 1/11 as likely as all the other tokens together: each completion ends within its 8
    # tokens with probability ~1/2, so of 8 some end and some run on (all alike: ~1% of random streams).
    boost[end_of_turn] = math.log(vocab) - math.log(11.0)
    trainer.model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost.to(output.dtype))
    batch = trainer.rollout(chosen, list(range(len(chosen))), torch.Generator().manual_seed(0))

    ids, mask = batch.completion_ids, batch.completion_mask
    assert not torch.isin(ids, torch.tensor(family.forbidden_ids)).any()
    ended = torch.isin(ids, torch.tensor(family.eos_ids)).any(1)
    assert (ids == end_of_turn).any(1).any() and (~ended).any() and torch.equal(batch.truncated, ~ended)
    for row_ids, row_mask, stopped, text in zip(ids.tolist(), mask.tolist(), ended.tolist(), batch.texts):
        n = sum(row_mask)
        assert row_mask == [1] * n + [0] * (len(row_ids) - n)
        if stopped:  # the completion ends at its first end-of-turn token, padding after it
            assert row_ids[n - 1] in family.eos_ids and not set(row_ids[: n - 1]) & set(family.eos_ids)
            assert row_ids[n:] == [family.pad_id] * (len(row_ids) - n)
        assert END_OF_TURN[folder] not in text
