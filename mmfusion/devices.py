"""Where and in which precision a model samples: `auto` devices and dtype names, checked with clear errors."""

from __future__ import annotations

import torch

from mmfusion.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_device(device: str | torch.device | None) -> torch.device:
    """The device to sample on: `auto` (or None) is the first GPU when there is one, else the CPU. A GPU
    that this machine does not have is a clear error, not a crash deep inside the first forward pass."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: give cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but this machine has no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def inference_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """torch.float32 or torch.bfloat16 from a dtype or a name (float32 / fp32, bfloat16 / bf16)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype or torch.float32
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(str(dtype), str(dtype).removeprefix("torch."))
    if name not in DTYPES:
        raise UserError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return DTYPES[name]
