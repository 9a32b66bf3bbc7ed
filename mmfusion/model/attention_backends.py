"""Attention for the generalized causal mask: dense masked SDPA, explicit math, or FlexAttention.

The generalized causal mask is block-structured (text causal, image groups), so FlexAttention can skip
blocks that are fully masked. On CPU FlexAttention has a forward only (no backward) and must be
compiled to be fast; `benchmarks/bench.py` measures both and docs/BENCHMARKS.md records the result.

`ModelConfig.attention`:
  * "auto" (default): SDPA, except for CPU training under bf16 autocast on short sequences, where
    the explicit softmax(q k^T) v is faster: SDPA's CPU flash-attention backward in bf16 is slow on
    short rows, while on long rows, in fp32 and without gradients SDPA is as fast or faster (the
    measurements are in docs/BENCHMARKS.md).
  * "sdpa": always dense masked SDPA; "math": always the explicit form;
  * "flex": FlexAttention with a block mask when not computing gradients on CPU, else SDPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_compiled: Callable | None = None
MATH_MAX_KEYS = 192  # "auto": the longest key length for which the explicit form wins (bf16 backward)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) masked) v, with the softmax in float32. q (B, H, Lq, D), k / v
    (B, H, Lk, D), mask (B, Lq, Lk) bool with at least one True per row -> (B, H, Lq, D)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return weights @ v.to(weights.dtype)


def _cpu_bf16_training(q: torch.Tensor) -> bool:
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if q.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k / v (B, H, Lk, D) where mask (B, Lq, Lk) is True, with the
    backend chosen as described in the module docstring."""
    if backend == "flex" and not (torch.is_grad_enabled() and q.device.type == "cpu"):
        return flex_attention_masked(q, k, v, mask)
    if backend == "math" or (backend == "auto" and k.shape[2] <= MATH_MAX_KEYS and _cpu_bf16_training(q)):
        return math_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


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
