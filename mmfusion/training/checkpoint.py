"""Checkpoint I/O: atomic writes (temporary file, fsync, rename), weights-only reads, and a sampling
pipeline from a run's checkpoint.

A process killed while a checkpoint is being written leaves the previous file untouched, and a
checkpoint is never unpickled with arbitrary code execution (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmfusion.config import config_from_dict
from mmfusion.errors import UserError
from mmfusion.pipeline import MMFusion
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.module import MMFusionModule
from mmfusion.training.sharded import load_sharded_checkpoint


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only; a checkpoint that would
    need to run code to load is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"refused to load {path}: it is not a weights-only checkpoint (loading it could run "
            "arbitrary code); only load checkpoints you trust, written by mmfusion or torch.save"
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return safe_torch_load(path, map_location or "cpu")


def load_run_checkpoint(ckpt: str | Path) -> MMFusion:
    """An MMFusion (EMA weights) from a Lightning checkpoint of `mmfusion train`, read safely
    (`weights_only=True`); the run folder two levels up supplies config.json and tokenizer.json."""
    ckpt = Path(ckpt)
    run = ckpt.parent.parent
    try:
        cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    except ValueError as err:  # a run config of an older version, say
        raise UserError(f"{run / 'config.json'}: {err}") from err
    tok = TextTokenizer.from_file(run / "tokenizer.json", max_len=cfg.data.max_text_len)
    module = MMFusionModule(cfg, tok)
    if ckpt.is_dir():  # a sharded checkpoint (train.strategy=fsdp)
        load_sharded_checkpoint(module, ckpt)
    else:
        module.load_state_dict(safe_torch_load(ckpt)["state_dict"])
    return MMFusion.from_module(module)
