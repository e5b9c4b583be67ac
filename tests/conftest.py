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


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory):
    """folder name -> the directory of a small random-weight model of that real checkpoint, beside its
    real processor files (tests/real_checkpoints.py), built once per session. Skips the test when the
    real processor files are not there (a clone from GitHub has none)."""
    from real_checkpoints import build_real_checkpoint, missing_reason

    built = {}

    def directory(folder: str):
        reason = missing_reason(folder)
        if reason:
            pytest.skip(reason)
        if folder not in built:
            built[folder] = build_real_checkpoint(folder, tmp_path_factory.mktemp(folder))
        return built[folder]

    return directory
