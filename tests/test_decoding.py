"""Static-shape decoding (grpo/decoding.py) samples exactly the tokens of the eager decoding loop.

Every family's tiny model, greedy and sampled with one seed, shared and plain path: the static path
(eager forward) gives the same tokens and masks, sliding-window (Gemma 3, window 8 against ~40-token
prompts) and linear-attention (Qwen3.5) layers included. The compiled forward (CPU inductor here)
gives the same tokens over a run's steps and compiles once per cache length (counted), on a plain
and on both layered families. A model that fails to compile, and a layer kind without a static
cache, decode eagerly after one notice.
"""

import copy

import pytest
import torch

import grpo.decoding
from grpo import GRPOConfig, Trainer
from grpo.decoding import StaticDecoder, wants_compiled_decoding
from grpo.logprobs import with_image_features
from grpo.models import family_for
from grpo.prompts import encode_prompts
from grpo.sampling import SamplingParams, generate
from grpo.tiny import FAMILIES, build_tiny_model_and_processor


@pytest.fixture(scope="module")
def rows(toy_rows):
    longer = copy.deepcopy(toy_rows[1])
    longer["prompt"][-1]["content"][-1]["text"] += " Look closely at the stroma and the nuclei."
    return [toy_rows[0], longer, toy_rows[2]]


def tiny_family(family_name: str, rows):
    """(family, its tiny model in eval mode, the rows' prompts with image features)."""
    model, processor = build_tiny_model_and_processor(seed=0, family=family_name, min_pixels=56 * 56, max_pixels=56 * 56)
    model.eval()
    family = family_for(model, processor, quiet=True)
    return family, model, with_image_features(family, model, encode_prompts(family, rows, [0, 1, 2], 4096))


@pytest.mark.parametrize("family_name", FAMILIES)
def test_static_decoding_samples_the_eager_loops_tokens(family_name, rows, capsys):
    family, model, prompts = tiny_family(family_name, rows)
    decoder = StaticDecoder(compile=False)
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_new_tokens=10, temperature=temperature)
        for shared in (True, False):
            runs = [generate(family, model, prompts, params, group_size=2, shared_prefix=shared, decoder=d,
                             generator=torch.Generator().manual_seed(3)) for d in (None, decoder)]
            assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].mask, runs[1].mask)
    assert decoder.why_not(family, model) is None  # sliding-window and linear-attention layers included
    # A later rollout of the same shape refills the same buffers (a CUDA graph's fixed addresses), from other prompts.
    buffers = {id(cache): [id(t) for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
               for cache in decoder._caches.values()}
    others = with_image_features(family, model, encode_prompts(family, rows, [2, 0, 1], 4096))
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    runs = [generate(family, model, others, params, group_size=2, decoder=d, generator=torch.Generator().manual_seed(5))
            for d in (None, decoder)]
    assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].mask, runs[1].mask)
    assert {id(cache): [id(t) for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
            for cache in decoder._caches.values()} == buffers
    assert "decoding eagerly" not in capsys.readouterr().err


def test_compiled_decoding_in_a_run_gives_the_eager_runs_completions_and_compiles_once_per_length(tiny_parts, toy_rows,
                                                                                               tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, processor = tiny_parts
    settings = dict(group_size=2, prompts_per_step=2, completions_per_micro_batch=4, max_completion_length=8,
                    max_steps=3, beta=0.0, save_steps=0, learning_rate=1e-3, log_completions=4)
    logged = {}
    for compiled in (False, True):
        cfg = GRPOConfig(output_dir=str(tmp_path / str(compiled)), compile_decode=compiled, **settings)
        trainer = Trainer(copy.deepcopy(model), processor, [lambda prompts, completions, **c: [len(x) for x in completions]],
                          toy_rows[:6], cfg)
        history = trainer.train()
        logged[compiled] = open(tmp_path / str(compiled) / "completions.jsonl").read(), [h["reward"] for h in history]
    assert logged[True] == logged[False]  # the same completions, so the same rewards and updates
    lengths = {trainer.decoder.cache_length(trainer._prompts(*trainer._rows_for_step(step)).input_ids.shape[1], 8)
               for step in range(3)}
    assert counters["stats"]["unique_graphs"] == len(lengths)  # no recompilation from step to step


@pytest.mark.parametrize("family_name", ["gemma3", "qwen3_5"])
def test_compiled_decoding_of_sliding_window_and_linear_attention_layers_samples_the_eager_tokens(family_name, rows):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    family, model, prompts = tiny_family(family_name, rows)
    decoder = StaticDecoder(compile=True)
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_new_tokens=12, temperature=temperature)
        eager, compiled = (generate(family, model, prompts, params, group_size=2, decoder=d,
                                    generator=torch.Generator().manual_seed(3)) for d in (None, decoder))
        assert torch.equal(eager.ids, compiled.ids) and torch.equal(eager.mask, compiled.mask)
    assert decoder.compile and counters["stats"]["unique_graphs"] == 1  # compiled (no fallback), once


def test_a_layer_kind_without_a_static_cache_decodes_eagerly_after_one_notice(tiny_parts, rows, capsys):
    model, processor = copy.deepcopy(tiny_parts)
    model.config.get_text_config().layer_types = ["full_attention", "chunked_attention"]
    family = family_for(model, processor, quiet=True)
    decoder = StaticDecoder(compile=False)
    assert not decoder.usable(family, model) and not decoder.usable(family, model)
    assert capsys.readouterr().err.count("chunked_attention layers have no static cache here; decoding eagerly") == 1


def test_a_model_that_does_not_compile_decodes_eagerly_after_one_notice(tiny_parts, rows, monkeypatch, capsys):
    model, processor = tiny_parts
    family = family_for(model, processor, quiet=True)
    prompts = encode_prompts(family, rows, [0, 1, 2], 4096)

    def broken_compile(module, **kwargs):
        def forward(**inputs):
            raise RuntimeError("backend exploded")
        return forward

    monkeypatch.setattr(grpo.decoding.torch, "compile", broken_compile)
    decoder = StaticDecoder(compile=True)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    got = [generate(family, model, prompts, params, group_size=2, decoder=d, generator=torch.Generator().manual_seed(0))
           for d in (decoder, decoder, None)]
    assert torch.equal(got[0].ids, got[2].ids) and torch.equal(got[1].ids, got[2].ids)
    assert capsys.readouterr().err.count("did not compile (RuntimeError: backend exploded); decoding eagerly") == 1


def test_compile_decode_settings():
    assert wants_compiled_decoding("auto", torch.device("cpu")) is False
    assert wants_compiled_decoding("auto", torch.device("cuda")) is True
    assert wants_compiled_decoding(True, torch.device("cpu")) is True
    with pytest.raises(ValueError, match="compile_decode must be 'auto', True or False"):
        wants_compiled_decoding("yes", torch.device("cpu"))
    with pytest.raises(ValueError, match="compile_decode must be 'auto', True or False, got 'yes'"):
        GRPOConfig(compile_decode="yes")
