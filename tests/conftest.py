"""Fixtures shared by every test module: the ../shared folder, and the tiny models and data sets.

The tiny models are built once per test run (pytest scope "session") and never handed out to be
changed: `tiny_sd_model` is a folder that tests only read (load it with lora_sd.models.load_pipeline),
`tiny_pipeline` and `tiny_lm` return a fresh deep copy on each call. Plain helper functions that
several modules call live in tests/helpers.py."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared():
    """The ../shared data folder, or skip with the reason."""
    from lora_core.paths import shared_dir
    d = shared_dir()
    if d is None:
        pytest.skip("../shared (or $LORA_SHARED_DIR) is absent: real data tests need it")
    return d


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny models: one thread is as fast, and far faster on a busy 2-core machine
    (no OpenMP spinning against the subprocesses some tests start)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ tiny models (random, seeded weights)
@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory) -> str:
    """The tiny SD 1.x pipeline as a diffusers folder, written once by `lora-sd tiny-model`. Read it, never
    write into it."""
    from lora_sd.cli import main  # lazy: the GUI-only test modules never load diffusers
    out = tmp_path_factory.mktemp("tiny_sd") / "model"
    assert main(["tiny-model", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """tiny_pipeline(seed=0, arch="sd1"): a tiny pipeline (lora_sd.models.build_tiny_pipeline) that is yours
    to change: a deep copy of the one built once per test run for that architecture and seed."""
    from lora_sd.models import build_tiny_pipeline  # lazy: the GUI-only test modules never load diffusers
    built = {("sd1", 0): build_tiny_pipeline()}   # built here, so .ci/shared_usage.py sees what the build reads

    def make(seed: int = 0, arch: str = "sd1"):
        if (arch, seed) not in built:
            built[arch, seed] = build_tiny_pipeline(seed, arch)
        return copy.deepcopy(built[arch, seed])
    return make


@pytest.fixture(scope="session")
def tiny_lm():
    """tiny_lm(seed=0, **config_overrides) -> (model, tokenizer): the tiny GPT-2 of
    lora_llm.models.make_tiny_model, a deep copy of the one built once per test run for those arguments."""
    from lora_llm.models import make_tiny_model  # lazy: the GUI-only test modules never load transformers
    built = {(0, ()): make_tiny_model()}   # built here, so .ci/shared_usage.py sees what the build reads

    def make(seed: int = 0, **overrides):
        key = (seed, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = make_tiny_model(seed=seed, **overrides)
        return copy.deepcopy(built[key])
    return make


# ------------------------------------------------------------------ tiny data sets
@pytest.fixture(scope="session")
def sd_dataset(tmp_path_factory):
    """lora_sd.testing.make_dataset: 4 generated captioned images, plus 3 DreamBooth photos in a kohya repeat
    folder when ../shared is present. Read it, never write into it."""
    from lora_sd.testing import make_dataset  # lazy: the GUI-only test modules never load diffusers
    return make_dataset(tmp_path_factory.mktemp("sd_data") / "images")
