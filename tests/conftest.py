import os

import pytest

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
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
