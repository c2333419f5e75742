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
