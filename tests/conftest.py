import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_RUN = [
    "model.preset=tiny",
    "image.patch_size=8",
    "data.shapes_n=64",
    "data.batch_size=8",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.log_every_n_steps=2",
    "train.precision=32-true",
    "sample.steps=3",
    "data.vocab_size=300",
]


@pytest.fixture
def tiny_cfg():
    from mmfusion.model.config import ModelConfig

    return ModelConfig.from_name("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny joint model trained for a few steps (shared by the pipeline and CLI tests)."""
    from mmfusion.config import load_config
    from mmfusion.training.run import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY_RUN, f"train.out={out}"])
    return train(cfg)
