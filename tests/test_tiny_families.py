"""Every tiny family of `grpo.tiny` is its real architecture, wired to its tokenizer and processor.

Each test renders a prompt row the way the library does (chat messages with an image part, rendered by
the processor's chat template) and feeds it through the processor and the model.
"""

import tempfile

import pytest
import torch
from PIL import Image

from grpo.tiny import FAMILIES, build_tiny_model_and_processor

# Expected values per family, stated independently of its module in grpo/models (a new family adds
# its own). The family's end-of-turn token(s): generation must stop there.
END_OF_TURN = {
    "qwen2_vl": ["<|im_end|>"],
    "qwen2_5_vl": ["<|im_end|>"],
    "qwen3_vl": ["<|im_end|>"],
    "qwen3_5": ["<|im_end|>"],
    "gemma3": ["<end_of_turn>", "<eos>"],
    "internvl": ["<|im_end|>"],
}
# The processor output that marks image tokens with 1 (None: the model finds them by the image token id).
IMAGE_TOKEN_ROW = {
    "qwen2_vl": "mm_token_type_ids",
    "qwen2_5_vl": "mm_token_type_ids",
    "qwen3_vl": "mm_token_type_ids",
    "qwen3_5": "mm_token_type_ids",
    "gemma3": "token_type_ids",
    "internvl": None,
}
SYSTEM = "You are a pathology assistant."


def prompt_rows():
    """Two library-style prompt rows with different question lengths, so the batch is padded."""
    rows = []
    for question, colour in [("Which stain?", (200, 30, 30)), ("Which stain is this, red or blue?", (30, 30, 200))]:
        rows.append({"prompt": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                     "image": Image.new("RGB", (56, 56), colour)})
    return rows


def encode(processor, rows, **kwargs):
    texts = [processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]
    # One list of images per prompt: Gemma 3's processor reads a flat list as all images of one prompt.
    return processor(text=texts, images=[[row["image"]] for row in rows], return_tensors="pt", padding=True, **kwargs)


_BUILT = {}


def tiny(family):
    if family not in _BUILT:
        _BUILT[family] = build_tiny_model_and_processor(seed=0, family=family)
    return _BUILT[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_its_real_architecture_and_small(family):
    model, _ = tiny(family)
    assert model.config.model_type == family
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = model.config.get_text_config()
    assert text.model_type == {"internvl": "qwen2"}.get(family, f"{family}_text")
    if family == "qwen3_vl":
        assert list(model.config.vision_config.deepstack_visual_indexes) == [0]
        assert len(model.model.visual.deepstack_merger_list) == 1
    if family == "qwen3_5":
        assert set(text.layer_types) == {"linear_attention", "full_attention"}
    if family == "gemma3":
        assert set(text.layer_types) == {"sliding_attention", "full_attention"}
        assert text.sliding_window < 40  # shorter than the test prompts, so the window masks something
    if family.startswith("qwen"):
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary_dim = int(head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))
        assert sum(text.rope_parameters["mrope_section"]) == rotary_dim // 2
    assert len(getattr(text, "layer_types", None) or [None] * text.num_hidden_layers) == text.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_image_placeholders_match_the_vision_tower_and_forward_is_finite(family):
    model, processor = tiny(family)
    inputs = encode(processor, prompt_rows())
    image_tokens = inputs["input_ids"] == model.config.image_token_id  # [B, P]
    row_key = IMAGE_TOKEN_ROW[family]
    if row_key is None:
        assert not {"mm_token_type_ids", "token_type_ids"} & set(inputs)
    else:
        assert torch.equal(inputs[row_key].bool(), image_tokens)

    image_inputs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    with torch.no_grad():
        features = model.model.get_image_features(**image_inputs).pooler_output
    per_image = features if isinstance(features, (list, tuple)) else [features]  # Qwen: one tensor per image
    features = torch.cat([f.reshape(-1, f.shape[-1]) for f in per_image])
    text = model.config.get_text_config()
    assert features.shape == (image_tokens.sum(), text.hidden_size)  # one feature per placeholder, LM width
    assert image_tokens.sum(1).tolist() == [features.shape[0] // 2] * 2  # same-size images, same count per row

    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert text.vocab_size == len(processor.tokenizer)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_forward_gives_a_finite_loss_and_gradient(family):
    model, processor = tiny(family)
    inputs = encode(processor, prompt_rows())
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.train()
    try:
        # Gemma 3 gets its token_type_ids here: in training they set bidirectional attention inside images.
        out = model(**inputs, labels=labels)
        out.loss.backward()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(out.loss)
    if family == "gemma3":
        with torch.no_grad():
            without = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
            with_rows = model(**inputs).logits
        assert not torch.allclose(without, with_rows)  # the image tokens' attention really changes


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_is_the_generation_eos_and_closes_the_assistant_turn(family):
    model, processor = tiny(family)
    tokenizer = processor.tokenizer
    end_ids = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert tokenizer.convert_ids_to_tokens(end_ids) == END_OF_TURN[family]  # in the vocabulary
    eos = model.generation_config.eos_token_id
    assert (eos if isinstance(eos, list) else [eos]) == end_ids
    assert tokenizer.pad_token_id is not None and model.generation_config.pad_token_id == tokenizer.pad_token_id

    messages = prompt_rows()[0]["prompt"]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(messages + [{"role": "assistant", "content": "B) blue"}], tokenize=False)
    assert full.startswith(prompt)  # prompt + completion renders as the conversation does
    assert full[len(prompt):].startswith("B) blue" + END_OF_TURN[family][0])
    string_content = processor.apply_chat_template([{"role": "user", "content": "Which stain?"}], tokenize=False)
    assert "Which stain?" + END_OF_TURN[family][0] in string_content


def test_gemma3_template_merges_the_system_turn_and_speaks_as_model():
    _, processor = tiny("gemma3")
    messages = prompt_rows()[0]["prompt"] + [{"role": "assistant", "content": "B) blue"}]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        f"<bos><start_of_turn>user\n{SYSTEM}\n\n<start_of_image>Which stain?<end_of_turn>\n"
        "<start_of_turn>model\nB) blue<end_of_turn>\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_extends_the_prompts(family):
    model, processor = tiny(family)
    inputs = encode(processor, prompt_rows(), padding_side="left")
    assert inputs["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    model.eval()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_length < out.shape[1] <= prompt_length + 3
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])
    assert int(out.max()) < len(processor.tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_gives_the_same_tokens_and_logits(family):
    """The trainer saves checkpoints with save_pretrained and reloads them with the Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny(family)
    inputs = encode(processor, prompt_rows())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        reloaded_processor = AutoProcessor.from_pretrained(tmp)
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp).eval()
    again = encode(reloaded_processor, prompt_rows())
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    completion = "<think>red nuclei, blue stroma</think> <answer>B) blue</answer>"
    assert reloaded_processor.tokenizer(completion)["input_ids"] == processor.tokenizer(completion)["input_ids"]
    assert reloaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**again).logits, model(**inputs).logits)


def test_default_family_is_qwen2_5_vl():
    default, default_processor = build_tiny_model_and_processor(seed=0)
    named, named_processor = build_tiny_model_and_processor(seed=0, family="qwen2_5_vl")
    assert type(named).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert default.state_dict().keys() == named.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), named.state_dict().values()))
    assert torch.equal(encode(default_processor, prompt_rows())["input_ids"],
                       encode(named_processor, prompt_rows())["input_ids"])


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny_model_and_processor(seed=1, family="gemma3")
    assert torch.equal(torch.rand(3), expected)
    b, _ = build_tiny_model_and_processor(seed=1, family="gemma3")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_family_is_named_in_the_error():
    with pytest.raises(ValueError, match="llava"):
        build_tiny_model_and_processor(family="llava")
