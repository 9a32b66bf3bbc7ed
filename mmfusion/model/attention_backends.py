"""Attention for the generalized causal mask: dense masked SDPA, or FlexAttention with a block mask.

The generalized causal mask is block-structured (text causal, image groups), so FlexAttention can skip
blocks that are fully masked. On CPU FlexAttention has a forward only (no backward) and must be
compiled to be fast; `scripts/bench.py` measures both and docs/BENCHMARKS.md records the result.
The model uses dense SDPA for training everywhere and FlexAttention only when asked to
(`ModelConfig.attention = "flex"`) and not computing gradients on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_compiled: Callable | None = None


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex() -> Callable:
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, Lq, D), k / v (B, H, Lk, D), mask (B, Lq, Lk) bool -> (B, H, Lq, D), via a BlockMask
    derived from the dense mask (blocks with no allowed pair are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, lq, _ = q.shape
    lk = k.shape[2]

    def mask_mod(bi: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return mask[bi, qi, ki]

    block = create_block_mask(mask_mod, b, None, lq, lk, device=q.device)
    return _flex()(q, k, v, block_mask=block)
