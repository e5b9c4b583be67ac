"""Chat templates of real checkpoints: SFT targets, thinking modes and the R1 format.

On the real processor files (tests/real_checkpoints.py): prompt + SFT target ids equal what
transformers encodes for the whole conversation; Qwen3.5 with thinking on and off renders the
documented prompt, its completions are read by the rewards together with the `<think>` the prompt
opened, and the combinations that cannot work (the R1 format where the template closes an empty think
block) stop at start with a message that says what to set.
"""

import json

import pytest
import torch

from grpo import GRPOConfig, SFTConfig, SFTTrainer, Trainer
from grpo.models import family_for
from grpo.prompts import encode_prompts
from grpo.sampling import Completions, decode_completions
from grpo.sft import encode_targets
from grpo.templates import ChatTemplate
from grpo.loading import load_model, load_processor
from rewards import accuracy_reward, format_reward
from real_checkpoints import FOLDERS, build_real_checkpoint, missing_reason

THINKING = {"enable_thinking": True}
QUESTION = "Which pattern is shown? A) Palisading B) Whorled pattern"
REASONED = "<think>Cells in whorls around a vessel.</think><answer>B) Whorled pattern</answer>"


def image(width=224, height=160):
    return __import__("PIL.Image").Image.new("RGB", (width, height), (150, 60, 90))


def messages(with_image=None):
    part = {"type": "image", "image": with_image} if with_image is not None else {"type": "image"}
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """folder -> (model, processor), loaded by path from a directory laid out as the user's."""
    loaded = {}
    for folder in FOLDERS:
        if missing_reason(folder) is None:
            path = build_real_checkpoint(folder, tmp_path_factory.mktemp(folder))
            loaded[folder] = load_model(str(path)), load_processor(None, str(path))
    return loaded


def parts(checkpoints, folder):
    reason = missing_reason(folder)
    if reason:
        pytest.skip(reason)
    return checkpoints[folder]


@pytest.mark.parametrize("folder, kwargs, target", [
    ("qwen2_5_vl", None, REASONED),
    ("gemma3", None, REASONED),
    ("qwen3_5", THINKING, REASONED),
    ("qwen3_5", None, "<answer>B) Whorled pattern</answer>"),
])
def test_sft_prompt_and_target_ids_equal_transformers_encoding_of_the_conversation(checkpoints, folder, kwargs, target):
    model, processor = parts(checkpoints, folder)
    family = family_for(model, processor, quiet=True, chat_template_kwargs=kwargs)
    picture = image()
    row = {"prompt": messages(), "image": picture, "completion": target}
    prompt = encode_prompts(family, [row], [0], 4096)
    ids, mask, cut = encode_targets(family, [row], [0], 256)
    ours = prompt.input_ids[0].tolist() + ids[0][mask[0].bool()].tolist()

    conversation = messages(picture) + [{"role": "assistant", "content": target}]
    expected = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, **(kwargs or {}))["input_ids"]
    expected = expected[0] if isinstance(expected[0], list) else expected
    assert cut == 0
    assert ours == expected[: len(ours)]  # the whole conversation, through the end of the assistant's turn
    assert ours[-1] == family.end_of_turn_id and family.end_of_turn_id in family.eos_ids


def test_qwen3_5_renders_the_documented_prompt_with_thinking_on_and_off():
    reason = missing_reason("qwen3_5")
    if reason:
        pytest.skip(reason)
    from real_checkpoints import real_processors_root
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(real_processors_root() / "qwen3_5")
    off, on = ChatTemplate(processor), ChatTemplate(processor, THINKING)
    assert off.render(messages()).endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (off.opened, off.closes_reasoning) == ("", True)
    assert on.render(messages()).endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert (on.opened, on.closes_reasoning) == ("<think>\n", False)
    # Qwen2.5-VL has no think block in its template: nothing opened, nothing closed.
    if missing_reason("qwen2_5_vl") is None:
        qwen25 = ChatTemplate(AutoProcessor.from_pretrained(real_processors_root() / "qwen2_5_vl"))
        assert (qwen25.opened, qwen25.closes_reasoning) == ("", False)
        assert "You are a helpful assistant." in qwen25.render(messages())  # the default system turn


def test_rewards_read_the_think_block_the_prompt_opened(checkpoints):
    model, processor = parts(checkpoints, "qwen3_5")
    family = family_for(model, processor, quiet=True, chat_template_kwargs=THINKING)
    written = "Cells in whorls around a vessel.\n</think>\n\n<answer>B) Whorled pattern</answer>"
    ids = processor.tokenizer(written, add_special_tokens=False)["input_ids"] + [family.end_of_turn_id]
    completions = Completions(ids=torch.tensor([ids]), mask=torch.ones(1, len(ids), dtype=torch.long),
                              truncated=torch.tensor([False]))
    text = decode_completions(family, completions)[0]
    assert text == "<think>\n" + written
    assert format_reward(None, [text]) == [1.0]
    assert accuracy_reward(None, [text], solution=["B) Whorled pattern"]) == [1.0]
    # Without the opened tag the same tokens would fail the format: the prefix is what makes it right.
    assert format_reward(None, [written]) == [0.0]


def test_the_r1_format_where_the_template_closes_the_think_block_stops_at_start(checkpoints, tmp_path):
    model, processor = parts(checkpoints, "qwen3_5")
    rows = [{"prompt": messages(), "image": image(), "solution": "B) Whorled pattern", "completion": REASONED}] * 2
    grpo = dict(output_dir=str(tmp_path / "grpo"), group_size=2, prompts_per_step=2, completions_per_micro_batch=4,
                max_completion_length=4, max_steps=1, beta=0.0, save_steps=0)
    with pytest.raises(ValueError, match=r"format_reward.*closes an empty one.*enable_thinking"):
        Trainer(model, processor, [format_reward, accuracy_reward], rows, GRPOConfig(**grpo))
    with pytest.raises(ValueError, match=r"row 0: field 'completion' holds a <think> block.*enable_thinking"):
        SFTTrainer(model, processor, rows, SFTConfig(output_dir=str(tmp_path / "sft"), batch_size=2, micro_batch_size=2,
                                                      max_steps=1))
    # Rewards that do not read a think block train with thinking off; the R1 format with thinking on.
    Trainer(model, processor, [accuracy_reward], rows, GRPOConfig(**grpo))
    trainer = Trainer(model, processor, [format_reward, accuracy_reward], rows,
                      GRPOConfig(**{**grpo, "output_dir": str(tmp_path / "on"), "chat_template_kwargs": THINKING}))
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "on" / "completions.jsonl")]
    assert logged and all(record["completion"].startswith("<think>\n") for record in logged)


def test_the_command_line_passes_template_arguments_to_evaluation(tmp_path, toy_rows):
    """`prompt.chat_template_kwargs` reaches the rendering: on Qwen3.5 with thinking on, evaluation's
    completions are read from the opened <think>; without it the format reward stops the command."""
    import yaml

    from grpo.cli import main

    reason = missing_reason("qwen3_5")
    if reason:
        pytest.skip(reason)
    model_dir = build_real_checkpoint("qwen3_5", tmp_path / "model")
    (tmp_path / "images").mkdir()
    with open(tmp_path / "eval.jsonl", "w") as f:
        for row in toy_rows[:2]:
            row["image"].save(tmp_path / "images" / f"{row['id']}.png")
            item = {key: row[key] for key in ("id", "question", "options", "solution")}
            f.write(json.dumps({**item, "image": f"images/{row['id']}.png"}) + "\n")
    config = {"model": str(model_dir), "data": {"eval": str(tmp_path / "eval.jsonl")},
              "prompt": {"system": None, "chat_template_kwargs": THINKING},
              "evaluate": {"output_dir": str(tmp_path / "eval"), "batch_size": 2, "max_completion_length": 3}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = main(["evaluate", "--config", str(tmp_path / "run.yaml")])
    assert [r["completion"][:8] for r in result["records"]] == ["<think>\n"] * 2
    with pytest.raises(ValueError, match="enable_thinking"):
        main(["evaluate", "--config", str(tmp_path / "run.yaml"), "--set", "prompt.chat_template_kwargs=null",
              "--set", f"evaluate.output_dir={tmp_path / 'eval2'}"])


@pytest.mark.parametrize("folder", ["qwen3_5", "gemma3", "qwen2_5_vl"])
def test_a_real_checkpoint_loaded_in_bf16_trains_and_decodes_the_same_tokens_statically(real_checkpoint, folder,
                                                                                       tmp_path):
    """Loaded by path in bf16 as a user loads a published checkpoint: GRPO steps move the bf16 weights
    (fp32 master weights), and static-shape decoding samples the eager loop's tokens in bf16 too, on the
    real layer patterns (Gemma 3's sliding-window layers, Qwen3.5's linear attention)."""
    from grpo.decoding import StaticDecoder
    from grpo.logprobs import with_image_features
    from grpo.sampling import SamplingParams, generate

    path = str(real_checkpoint(folder))
    kwargs = THINKING if folder == "qwen3_5" else None
    rows = [{"prompt": messages(), "image": image(224 + 32 * i, 160), "solution": "B) Whorled pattern"} for i in range(2)]
    cfg = GRPOConfig(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, completions_per_micro_batch=4,
                     max_completion_length=4, max_steps=2, beta=0.04, save_steps=0, learning_rate=1e-5,
                     dtype="bfloat16", chat_template_kwargs=kwargs)
    trainer = Trainer(path, None, [format_reward, accuracy_reward,
                                   lambda prompts, completions, **c: [float(len(x)) for x in completions]], rows, cfg)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in before.values())
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    # lr 1e-5 is below bf16's spacing at most weights: the fp32 masters carry the updates, and the model's
    # weights are their bf16 rounding.
    masters = trainer.opt.master_weights.state_dict()
    params = dict(trainer.model.named_parameters())
    assert masters.keys() == before.keys() and all(m.dtype == torch.float32 for m in masters.values())
    assert all(torch.equal(params[name].detach(), master.to(torch.bfloat16)) for name, master in masters.items())
    layers = [name for name in masters if ".layers." in name and name.endswith("weight") and masters[name].dim() == 2]
    moved = sum(int((masters[name] != before[name].float()).sum()) for name in layers)
    assert layers and moved > 0.9 * sum(masters[name].numel() for name in layers)

    model, family = trainer.model.eval(), trainer.family
    prompts = with_image_features(family, model, encode_prompts(family, rows, [0, 1], 4096).to(trainer.device))
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    runs = [generate(family, model, prompts, params, group_size=2, decoder=d, generator=torch.Generator().manual_seed(5))
            for d in (None, StaticDecoder(compile=False))]
    assert torch.equal(runs[0].ids, runs[1].ids)
    assert StaticDecoder().why_not(family, model) is None  # the static path ran: Gemma's sliding and Qwen3.5's linear layers too


@pytest.mark.parametrize("folder", ["gemma3", "qwen3_5"])
def test_compiled_decoding_of_a_real_checkpoint(real_checkpoint, folder):
    """The compiled decoding step (CPU inductor here) on the real layer patterns: Gemma 3's five
    sliding-window layers to one global, Qwen3.5's linear attention. Greedy and sampled, the tokens of
    the eager loop, compiled once. In float32: in bf16 the compiled kernels round in other places, and
    greedy decoding of this random-weight Qwen3.5 (a 248k vocabulary) picked another 8th token in 2 of
    4 rows (Gemma 3 gave the same tokens)."""
    from torch._dynamo.utils import counters

    from grpo.decoding import StaticDecoder
    from grpo.logprobs import with_image_features
    from grpo.sampling import SamplingParams, generate

    torch._dynamo.reset()
    counters.clear()
    path = str(real_checkpoint(folder))
    model, processor = load_model(path, dtype="float32").eval(), load_processor(None, path)
    family = family_for(model, processor, quiet=True, chat_template_kwargs=THINKING if folder == "qwen3_5" else None)
    rows = [{"prompt": messages(), "image": image(224 + 32 * i, 160)} for i in range(2)]
    prompts = with_image_features(family, model, encode_prompts(family, rows, [0, 1], 4096))
    decoder = StaticDecoder(compile=True)
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_new_tokens=8, temperature=temperature)
        eager, compiled = (generate(family, model, prompts, params, group_size=2, decoder=d,
                                    generator=torch.Generator().manual_seed(5)) for d in (None, decoder))
        assert torch.equal(eager.ids, compiled.ids) and torch.equal(eager.mask, compiled.mask), temperature
    assert decoder.compile and counters["stats"]["unique_graphs"] == 1
