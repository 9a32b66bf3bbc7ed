"""Saved LoRA adapters (peft folders from `mmfusion finetune`) folded into a model for sampling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel
from torch import nn

from mmfusion.errors import UserError


def merge_adapters(model: nn.Module, adapters: Sequence[str | Path]) -> nn.Module:
    """Fold one or more saved adapters into the weights of `model` (their deltas add up)."""
    for path in adapters:
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise UserError(
                f"{path} is not a LoRA adapter folder (no adapter_config.json); make one with `mmfusion finetune`"
            )
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model
