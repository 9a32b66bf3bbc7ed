"""`mmfusion vae train`: a small diffusers AutoencoderKL for users without a pretrained one.

Loss: L1 reconstruction + `kl_weight` x KL to N(0, I). After training, the scaling factor is set to
1 / std of the latents (as Stable Diffusion's 0.18215 was chosen), so diffusion sees unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmfusion.data.datamodule import CaptionedImages, collate_items
from mmfusion.data.datasets import load_captioned
from mmfusion.tokenizers.vq import QUANTIZER_FILE, BinaryQuantizer
from mmfusion.training.callbacks import lightning_warnings_filtered, step_progress_bar


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64)  # one down-sampling per extra level: f = 2^(levels-1)
    latent_channels: int = 4
    layers_per_block: int = 1
    kl_weight: float = 1e-6
    lr: float = 2e-4
    batch_size: int = 32
    steps: int = 2000


def build_autoencoder(cfg: VAEConfig):  # noqa: ANN201
    from diffusers import AutoencoderKL

    levels = len(cfg.channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.channels,
        latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=min(32, cfg.channels[0]),
        sample_size=cfg.image_size,
    )


class VAEModule(L.LightningModule):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = build_autoencoder(cfg)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["size"] == 0:
            return None
        x = batch["images"]
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        rec = (recon - x).abs().mean()
        kl = dist.kl().mean() / x[0].numel()
        loss = rec + self.cfg.kl_weight * kl
        self.log_dict({"train/recon_l1": rec, "train/kl": kl}, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.lr, weight_decay=0.0)


@torch.no_grad()
def latent_std(vae: Any, loader: DataLoader, batches: int = 8) -> float:
    zs = []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        zs.append(vae.encode(batch["images"]).latent_dist.mode())
    return float(torch.cat(zs).std())


def fit_autoencoder(
    module: L.LightningModule, data: str, split: str, cfg: VAEConfig | VQConfig, seed: int, out: str | Path
) -> CaptionedImages:
    """Fit an image autoencoder module on the images of any source `load_captioned` reads, with the
    image size, batch size and steps of its config."""
    L.seed_everything(seed, verbose=False)
    ds = CaptionedImages(load_captioned(data, need_captions=False)[split], None, cfg.image_size, 0)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_items, drop_last=True)
    trainer = L.Trainer(
        max_steps=cfg.steps,
        max_epochs=-1,
        callbacks=[step_progress_bar()],
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    with lightning_warnings_filtered():
        trainer.fit(module, loader)
    return ds


def train_vae(data: str, out: str | Path, cfg: VAEConfig, split: str = "train", seed: int = 0) -> Path:
    """Train on the images of `data` (any source `load_captioned` reads); save a diffusers folder."""
    module = VAEModule(cfg)
    ds = fit_autoencoder(module, data, split, cfg, seed, out)
    vae = module.vae.eval()
    std = latent_std(vae, DataLoader(ds, batch_size=64, collate_fn=collate_items))
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    vae.save_pretrained(str(out))
    print(f"latent std {std:.4f} -> scaling_factor {1 / std:.4f}")
    return Path(out)


@dataclass(frozen=True)
class VQConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 64)  # f = 2^(levels-1): 4 -> 8 x 8 codes at 32 px
    quantizer: str = "vq"  # vq (codebook) | binary (lookup-free, codes of `bits` bits)
    codebook_size: int = 256
    bits: int = 8
    embed_dim: int = 8
    layers_per_block: int = 1
    lr: float = 5e-4
    batch_size: int = 32
    steps: int = 2000


def build_vq(cfg: VQConfig):  # noqa: ANN201
    from diffusers import VQModel

    if cfg.quantizer not in ("vq", "binary"):
        raise ValueError(f"quantizer must be vq or binary, got {cfg.quantizer!r}")
    levels = len(cfg.channels)
    dim = cfg.bits if cfg.quantizer == "binary" else cfg.embed_dim
    vq = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.channels,
        latent_channels=dim,
        vq_embed_dim=dim,
        num_vq_embeddings=cfg.codebook_size,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=min(32, cfg.channels[0]),
        sample_size=cfg.image_size,
    )
    if cfg.quantizer == "binary":
        vq.quantize = BinaryQuantizer(cfg.bits)
    return vq


class VQModule(L.LightningModule):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vq = build_vq(cfg)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["size"] == 0:
            return None
        x = batch["images"]
        out = self.vq(x)
        rec = (out.sample - x).abs().mean()
        commit = out.commit_loss.mean()
        self.log_dict({"train/recon_l1": rec, "train/commit": commit}, prog_bar=True, batch_size=len(x))
        return rec + commit

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.vq.parameters(), lr=self.cfg.lr, weight_decay=0.0)


def train_vq(data: str, out: str | Path, cfg: VQConfig, split: str = "train", seed: int = 0) -> Path:
    """Train a small VQ autoencoder on `data`; save a diffusers VQModel folder (plus the binary
    quantiser's settings, which VQModel does not know about)."""
    import json

    module = VQModule(cfg)
    fit_autoencoder(module, data, split, cfg, seed, out)
    out = Path(out)
    module.vq.save_pretrained(str(out))
    if cfg.quantizer == "binary":
        (out / QUANTIZER_FILE).write_text(json.dumps({"kind": "binary", "bits": cfg.bits}))
    return out
