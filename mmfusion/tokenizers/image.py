"""Continuous image tokenizers behind one interface: image (B, 3, H, W) in [-1, 1] <-> tokens (B, N, C).

* `PixelTokenizer`: p x p patches of raw pixels, for tiny CPU runs.
* `VAETokenizer`: a diffusers AutoencoderKL (e.g. the SD VAE, from a local folder or hub id); latents are
  scaled by the VAE's scaling factor and then patchified p x p (paper: f8, 4 channels, p = 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmfusion.errors import UserError
from mmfusion.tokenizers.config import ImageTokenizerConfig


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), row-major over patches."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    b = tokens.shape[0]
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


class ContinuousTokenizer(nn.Module):
    """Shared surface: `cfg` (an ImageTokenizerConfig) fixes the token grid and the token width."""

    cfg: ImageTokenizerConfig

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def token_dim(self) -> int:
        return self.cfg.token_dim


class PixelTokenizer(ContinuousTokenizer):
    """p x p patches of raw pixels in [-1, 1]."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise UserError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.cfg.patch_size)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.cfg.patch_size, self.grid, self.cfg.channels).clamp(-1, 1)


class VAETokenizer(ContinuousTokenizer):
    """Latents of a diffusers AutoencoderKL, scaled (and shifted) by its config, then patchified."""

    def __init__(self, cfg: ImageTokenizerConfig, vae: nn.Module | None = None) -> None:
        super().__init__()
        if vae is None:
            vae = load_autoencoder(cfg.path)
        vae.requires_grad_(False).eval()
        self.vae = vae
        vcfg = vae.config
        self.scale = float(getattr(vcfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(vcfg, "shift_factor", 0.0) or 0.0)
        down = 2 ** (len(vcfg.block_out_channels) - 1)
        self.cfg = ImageTokenizerConfig(
            kind="vae",
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            path=cfg.path,
            channels=vcfg.latent_channels,
            downsample=down,
        )
        if cfg.image_size % (down * cfg.patch_size):
            raise UserError(
                f"image_size {cfg.image_size} must be a multiple of {down * cfg.patch_size} "
                f"(VAE downsampling {down} x patch {cfg.patch_size})"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample() if sample else dist.mode()
        return patchify((z.float() - self.shift) * self.scale, self.cfg.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = unpatchify(tokens, self.cfg.patch_size, (self.grid[0], self.grid[1]), self.cfg.channels)
        z = z / self.scale + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def load_autoencoder(path: str | None):  # noqa: ANN201
    """An AutoencoderKL from a local folder (with or without a `vae/` sub-folder) or a hub id."""
    from diffusers import AutoencoderKL

    if not path:
        raise UserError(
            "the vae image tokenizer needs a model (`image.path` in a config, `--vae` for `data encode`): "
            "a local AutoencoderKL folder or a hub id "
            "(train a small one with `mmfusion vae train`)"
        )
    local = Path(path)
    if local.is_dir() and (local / "vae" / "config.json").exists():
        return AutoencoderKL.from_pretrained(local / "vae")
    if local.is_dir() and not (local / "config.json").exists():
        raise UserError(f"{path} has no config.json: expected a diffusers AutoencoderKL folder")
    try:
        return AutoencoderKL.from_pretrained(path)
    except OSError as err:
        raise UserError(
            f"cannot load an AutoencoderKL from {path!r} ({err}); pass a local folder, or a hub "
            "id on a machine with internet access"
        ) from err
