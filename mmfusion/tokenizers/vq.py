"""Discrete image tokenizers: a diffusers VQModel (codebook), or the same autoencoder with a binary
lookup-free quantiser whose codes are d bits (Infinity / LFQ style).

Images (B, 3, H, W) in [-1, 1] <-> code grids (B, h, w) of integers in [0, codebook_size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmfusion.errors import UserError
from mmfusion.tokenizers.config import ImageTokenizerConfig

QUANTIZER_FILE = "mmfusion_quantizer.json"


def bits_to_int(bits: torch.Tensor) -> torch.Tensor:
    """(..., d) bool -> (...) int64, bit i worth 2^i."""
    weights = 2 ** torch.arange(bits.shape[-1], device=bits.device)
    return (bits.long() * weights).sum(-1)


def int_to_bits(codes: torch.Tensor, d: int) -> torch.Tensor:
    """(...) int64 -> (..., d) bool."""
    return (codes[..., None] >> torch.arange(d, device=codes.device)) & 1 == 1


class BinaryQuantizer(nn.Module):
    """Lookup-free quantiser: each latent channel becomes one bit (sign), so a code is d bits.

    Training uses the straight-through estimator, a commitment term and a balance term that keeps
    every bit used about half of the time. Drop-in for diffusers' VectorQuantizer inside VQModel.
    """

    def __init__(self, bits: int, beta: float = 0.25, balance: float = 0.1) -> None:
        super().__init__()
        self.bits, self.beta, self.balance = bits, beta, balance

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, Any, torch.Tensor]]:
        zq = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        usage = torch.sigmoid(4 * z).mean(dim=(0, 2, 3))  # soft share of ones per bit
        loss = self.beta * (z - zq.detach()).pow(2).mean() + self.balance * (usage - 0.5).pow(2).mean()
        z_q = z + (zq - z).detach()
        indices = bits_to_int(z.permute(0, 2, 3, 1) > 0).reshape(-1)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        b, h, w, _ = shape
        bits = int_to_bits(indices.reshape(b, h, w), self.bits)
        return torch.where(bits, 1.0, -1.0).permute(0, 3, 1, 2).contiguous()


def load_vq(path: str | None):  # noqa: ANN201
    """A diffusers VQModel from a local folder or hub id; binary-quantiser folders (from `mmfusion vq
    train --quantizer binary`) get their quantiser back."""
    from diffusers import VQModel
    from diffusers.utils import logging as diffusers_logging

    if not path:
        raise UserError(
            "the vq image tokenizer needs a model (`image.path` in a config, `--vae` for `data encode`): "
            "a diffusers VQModel folder or hub id "
            "(train a small one with `mmfusion vq train`)"
        )
    local = Path(path)
    if local.is_dir() and (local / "vqvae" / "config.json").exists():
        local = local / "vqvae"
    meta = local / QUANTIZER_FILE
    info = json.loads(meta.read_text()) if local.is_dir() and meta.exists() else {}
    binary = info.get("kind") == "binary"
    log = diffusers_logging.get_verbosity()
    if binary:  # its codebook is not stored (the binary quantiser has none): diffusers' warning is moot
        diffusers_logging.set_verbosity_error()
    try:
        vq = VQModel.from_pretrained(str(local) if local.is_dir() else path)
    except OSError as err:
        raise UserError(f"cannot load a VQModel from {path!r} ({err}); pass a local folder") from err
    finally:
        diffusers_logging.set_verbosity(log)
    if binary:
        vq.quantize = BinaryQuantizer(int(info["bits"]))
    return vq


class VQTokenizer(nn.Module):
    """Image <-> code grid through a (frozen) VQModel."""

    def __init__(self, cfg: Any, vq: nn.Module | None = None) -> None:
        super().__init__()
        vq = vq if vq is not None else load_vq(cfg.path)
        self.vq = vq.requires_grad_(False).eval()
        down = 2 ** (len(vq.config.block_out_channels) - 1)
        binary = isinstance(vq.quantize, BinaryQuantizer)
        self.bits = vq.quantize.bits if binary else 0
        self.codebook_size = 2**self.bits if binary else vq.config.num_vq_embeddings
        self.embed_dim = vq.config.vq_embed_dim or vq.config.latent_channels
        self.cfg = ImageTokenizerConfig(
            kind="vq", image_size=cfg.image_size, patch_size=1, path=cfg.path, channels=self.embed_dim, downsample=down
        )
        if cfg.image_size % down:
            raise UserError(f"image_size {cfg.image_size} must be a multiple of the VQ downsampling {down}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.downsample
        return side, side

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> codes (B, h, w)."""
        h = self.vq.encode(images.to(self.vq.dtype)).latents
        _, _, (_, _, idx) = self.vq.quantize(h)
        return idx.reshape(images.shape[0], *self.grid)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> (B, 3, H, W) in [-1, 1]."""
        b, h, w = codes.shape
        z = self.vq.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, self.embed_dim))
        return self.vq.decode(z, force_not_quantize=True).sample.float().clamp(-1, 1)
