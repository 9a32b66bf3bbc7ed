import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_cfg():
    from mmfusion.model.config import ModelConfig

    return ModelConfig.from_name("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
