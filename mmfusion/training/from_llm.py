"""Start a run from a Hugging Face LLaMA / Qwen2 / Qwen3 checkpoint: its backbone shape, tokenizer and weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmfusion.config import RunConfig
from mmfusion.model.hf import config_from_hf, load_hf_backbone, read_hf_config
from mmfusion.training.module import MMFusionModule


def with_llm_backbone(cfg: RunConfig, folder: str) -> RunConfig:
    """The run config with the backbone shape of a Hugging Face LLaMA / Qwen2 / Qwen3 folder and its tokenizer;
    the image and head settings stay the run's."""
    model = config_from_hf(read_hf_config(folder), base=cfg.model)  # the image side stays the run's
    data = cfg.data
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=str(Path(folder) / "tokenizer.json"))
    return dataclasses.replace(cfg, model=model, data=data)


def init_from_llm(module: MMFusionModule, folder: str) -> None:
    """Load the LLM's weights into the backbone and text embeddings / head (the EMA copy too), strictly:
    a checkpoint tensor without a place, or a backbone tensor missing, is an error (model/hf.py)."""
    loaded = load_hf_backbone(module.model, folder)
    if module.ema is not None:
        module.ema.load_state_dict(module.model.state_dict())
    print(f"initialised {len(loaded)} tensors from {folder}")
