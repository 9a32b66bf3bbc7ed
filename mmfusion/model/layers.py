"""Building blocks of the LLaMA-style backbone: RMSNorm, SwiGLU and rotary embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as LLaMA does, then cast back."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one call, the same numbers: on CPU it is still a composite of a few ops, but fewer
            # dispatches than the path below, and on small rows per-op overhead is most of a sampling pass
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """The LLaMA MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """cos / sin tables for rotary position embedding, indexed by per-token position ids.

    Position ids (B, L) give plain 1-D rotary. Ids (B, L, 3) give multimodal rotary: frequency i
    rotates by component i % 3 (sequence position, image row, image column); text tokens carry the
    same value in all three, which is exactly 1-D rotary.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", scaled_frequencies(inv_freq, **(scaling or {})), persistent=False)
        self.register_buffer("component", torch.arange(head_dim // 2) % 3, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables (B, 1, L, D) in `dtype` for `apply_rotary`: cos, and sin with the sign of the rotation
        folded in (negated over the first half)."""
        if position_ids.dim() == 3:  # (B, L, 3) -> the component each frequency follows
            pos = position_ids.float()[..., self.component]  # (B, L, D/2)
            freqs = pos * self.inv_freq
        else:
            freqs = position_ids[..., None].float() * self.inv_freq  # (B, L, D/2)
        sin = freqs.sin()
        cos = torch.cat((freqs, freqs), dim=-1).cos()  # (B, L, D)
        sin = torch.cat((-sin, sin), dim=-1)
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def scaled_frequencies(
    inv_freq: torch.Tensor,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
) -> torch.Tensor:
    """Rotary frequencies of a long-context checkpoint. "linear" divides every frequency by `factor`.
    "llama3" (Llama 3.1+) sorts them by wavelength against the original context length: wavelengths
    shorter than original_context / high_freq_factor are kept, those longer than original_context /
    low_freq_factor are divided by `factor`, and the band between blends the two linearly in
    original_context / wavelength."""
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / factor
    ratio = original_context * inv_freq / (2 * torch.pi)  # original context / wavelength
    keep = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return keep * inv_freq + (1 - keep) * inv_freq / factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, D) by the tables of `RotaryEmbedding` (B, 1, L, D): x cos + (-x2, x1) sin,
    with the sign of -x2 in the table. Bit-identical to the usual rotate-half form with fewer eager ops
    (no unsqueeze, no neg). Not `x.roll`, which made the compiled bf16 training step slower
    (docs/BENCHMARKS.md)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)
