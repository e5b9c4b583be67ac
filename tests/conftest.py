import pytest

from data import make_toy_dataset, to_prompt_rows
from grpo.tiny import build_tiny_model_and_processor


@pytest.fixture(scope="session")
def toy_rows():
    return to_prompt_rows(make_toy_dataset(64, seed=0, image_size=56), source="toy")


@pytest.fixture(scope="session")
def tiny_parts(toy_rows):
    corpus = [row["question"] + " " + " ".join(row["options"]) + " " + row["explanation"] for row in toy_rows]
    model, processor = build_tiny_model_and_processor(corpus=corpus, seed=0, min_pixels=56 * 56, max_pixels=56 * 56)
    return model, processor


@pytest.fixture
def decoded_batches(monkeypatch):
    """The number of prompts of each batch grpo.evaluate decodes (to check what a resumed evaluation redoes)."""
    import importlib

    module = importlib.import_module("grpo.evaluate")  # the module: `grpo.evaluate` the attribute is the function
    decoded = []
    real_generate = module.generate

    def counting_generate(family, model, prompts, *args, **kwargs):
        decoded.append(len(prompts))
        return real_generate(family, model, prompts, *args, **kwargs)

    monkeypatch.setattr(module, "generate", counting_generate)
    return decoded


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models run fastest single-threaded; two threads on a shared 2-core machine thrash.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
