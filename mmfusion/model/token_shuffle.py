"""Token-Shuffle (Meta, 2025): fuse s x s windows of discrete image codes into one transformer token,
and expand each output back to s^2 codes.

token-shuffle: embed each code, concatenate the s^2 embeddings along channels, MLP -> one token.
token-unshuffle: MLP -> s^2 slots, each with its own logits: a softmax over the codebook, or, for
d-bit binary codes, d independent binary classifiers (Infinity's bitwise heads). With
`window_head="autoregressive"` (an mmfusion option, not in the paper) slot j also reads the codes of
slots < j of its own window, so the s^2 codes of a window are drawn one after another rather than
independently of each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.model.config import ModelConfig


def fuse_grid(codes: torch.Tensor, s: int) -> torch.Tensor:
    """Code grid (B, h, w) -> fused tokens (B, h/s * w/s, s*s), raster order over windows."""
    b, h, w = codes.shape
    x = codes.reshape(b, h // s, s, w // s, s).permute(0, 1, 3, 2, 4)
    return x.reshape(b, (h // s) * (w // s), s * s)


def unfuse_grid(tokens: torch.Tensor, s: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `fuse_grid`: (B, N, s*s) -> (B, h, w) with (h, w) the code grid."""
    b = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(b, h // s, w // s, s, s).permute(0, 1, 3, 2, 4)
    return x.reshape(b, h, w)


def code_bits(codes: torch.Tensor, d: int) -> torch.Tensor:
    """Integer codes (...) -> bits as +-1 floats (..., d)."""
    bits = (codes[..., None] >> torch.arange(d, device=codes.device)) & 1
    return bits.float() * 2 - 1


def per_code_loss(logits: torch.Tensor, target: torch.Tensor, bits: int) -> torch.Tensor:
    """The loss (n, W) of each target code (n, W) under the code head's logits: cross-entropy over the
    codebook (n, W, K), or with `bits` > 0 the mean binary cross-entropy of its bits (n, W, bits)."""
    if bits:
        zero_one = code_bits(target, bits).clamp(min=0)  # +-1 -> {0, 1}
        return F.binary_cross_entropy_with_logits(logits, zero_one, reduction="none").mean(-1)
    # flattened (n * W, K): a class dim that is not last (logits.transpose(1, 2)) gives the same numbers
    # but a strided log-softmax, a good part slower
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)


def code_embedding(cfg: ModelConfig, width: int) -> nn.Module:
    """Embedding of one code: a linear map of its bits (binary codes) or a lookup table."""
    return nn.Linear(cfg.code_bits, width) if cfg.code_bits else nn.Embedding(cfg.image_codebook_size, width)


def embed_codes(embed: nn.Module, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (...) -> embeddings (..., width) through a `code_embedding` module."""
    return embed(code_bits(codes, bits).to(embed.weight.dtype)) if bits else embed(codes)


class TokenShuffle(nn.Module):
    """(n, s^2) codes -> (n, dim) transformer inputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, w = cfg.code_embed_dim, cfg.code_width
        self.bits = cfg.code_bits
        self.embed = code_embedding(cfg, e)
        self.fuse = nn.Sequential(nn.Linear(w * e, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = embed_codes(self.embed, codes, self.bits)  # (n, W, e)
        return self.fuse(x.flatten(1))  # (n, dim)


class TokenUnshuffle(nn.Module):
    """(n, dim) outputs -> per-slot logits (n, s^2, K), or bit logits (n, s^2, d) with bitwise heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, self.width = cfg.code_embed_dim, cfg.code_width
        self.expand = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, self.width * e))
        self.bitwise = bool(cfg.code_bits) and cfg.bitwise_head
        self.head = nn.Linear(e, cfg.code_bits if self.bitwise else cfg.image_codebook_size)

        self.context: nn.Module | None = None
        self.bits = cfg.code_bits
        if cfg.window_head == "autoregressive" and self.width > 1:
            self.prev_embed = code_embedding(cfg, e)
            self.context = nn.Sequential(nn.Linear(self.width * e, e), nn.SiLU(), nn.Linear(e, e))
            # earlier[j, i]: slot j reads the code of slot i
            self.register_buffer("earlier", torch.ones(self.width, self.width).tril(-1), persistent=False)

    @property
    def autoregressive(self) -> bool:
        return self.context is not None

    def slots(self, hidden: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(n, dim) -> slot features (n, W, e). The autoregressive head needs the window's codes (n, W):
        the true ones in training; in sampling, those drawn so far (slot j reads slots < j only, so
        the later entries may hold anything)."""
        out = self.expand(hidden).view(hidden.shape[0], self.width, -1)
        if self.context is None:
            return out
        if codes is None:
            raise ValueError("the autoregressive window head needs the codes of the window (slots before each)")
        prev = embed_codes(self.prev_embed, codes, self.bits)
        seen = prev[:, None, :, :] * self.earlier[None, :, :, None]  # (n, W slots, W codes, e)
        return out + self.context(seen.flatten(2).to(out.dtype))
