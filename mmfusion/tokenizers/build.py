"""The image tokenizer a config names: pixel patches, VAE latents or VQ codes."""

from __future__ import annotations

from torch import nn

from mmfusion.errors import UserError
from mmfusion.tokenizers.config import ImageTokenizerConfig
from mmfusion.tokenizers.image import PixelTokenizer, VAETokenizer
from mmfusion.tokenizers.vq import VQTokenizer


def build_image_tokenizer(cfg: ImageTokenizerConfig) -> nn.Module:
    if cfg.kind == "pixels":
        return PixelTokenizer(cfg)
    if cfg.kind == "vae":
        return VAETokenizer(cfg)
    if cfg.kind == "vq":
        return VQTokenizer(cfg)
    raise UserError(f"unknown image tokenizer kind {cfg.kind!r}: use pixels or vae (vq for Token-Shuffle)")
