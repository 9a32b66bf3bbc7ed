"""How images become tokens: a plain dataclass, so that reading a config loads no model code."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ImageTokenizerConfig:
    kind: str = "pixels"  # pixels | vae | vq (discrete, see mmfusion.tokenizers.vq)
    image_size: int = 32  # images are resized to this side in pixels
    patch_size: int = 4  # p: tokens are p x p patches (of pixels, or of VAE latents)
    path: str | None = None  # VAE / VQ model: a local folder or a hub id
    channels: int = 3  # pixel channels, or latent channels (read from the VAE when loaded)
    downsample: int = 1  # pixels per latent cell (8 for the SD VAE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // (self.downsample * self.patch_size)
        return side, side

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels
