"""Generation metrics through torchmetrics, with weights from local files only.

FID: `FrechetInceptionDistance(feature=<module>)` with the Inception feature extractor loaded from a
local TorchScript file (e.g. the widely used `inception-2015-12-05.pt` of the StyleGAN metrics, or
any TorchScript module mapping uint8 images (N, 3, H, W) to (N, D) features). CLIP score:
`CLIPScore` with a CLIP model folder (transformers format). Missing weights raise a clear error;
a metric is never silently reported as zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfusion.errors import UserError


class TorchScriptFeatures(nn.Module):
    """Wrap a TorchScript feature extractor for torchmetrics: uint8 images in, float features out."""

    def __init__(self, path: str | Path, size: int = 299) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"Inception weights {path} not found: FID needs a local TorchScript feature "
                "extractor (e.g. inception-2015-12-05.pt); nothing is downloaded"
            )
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.size = size
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[-1])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = (
                torch.nn.functional.interpolate(
                    x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False
                )
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return self.net(x).flatten(1).double()


def _uint8(images: list[Any]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1) for im in images]
    )


def frechet_distance(real: list[Any], fake: list[Any], inception: str | Path, batch_size: int = 64) -> float:
    """FID between two lists of PIL images with a local Inception feature extractor. The lists are the
    whole sets: nothing is gathered from other processes (torchmetrics would, under torch.distributed,
    and wait forever for ranks that leave the metrics to the main process)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=TorchScriptFeatures(inception), sync_on_compute=False)
    for is_real, images in ((True, real), (False, fake)):
        for i in range(0, len(images), batch_size):
            fid.update(_uint8(images[i : i + batch_size]), real=is_real)
    return float(fid.compute())


class _TensorFeatures(nn.Module):
    """transformers >= 5 returns output objects from `get_*_features`, torchmetrics 1.9's CLIPScore
    expects tensors (fixed upstream in Lightning-AI/torchmetrics#3408): hand it the projected tensor."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def clip_score(images: list[Any], prompts: list[str], clip: str | Path, batch_size: int = 64) -> float:
    """CLIP score as torchmetrics defines it: 100 x mean cosine of image and prompt, floored at 0;
    CLIP comes from a local folder. Computed on the images given, in this process alone (as FID)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    clip = Path(clip)
    if not (clip / "config.json").is_file():
        raise UserError(
            f"CLIP model folder {clip} not found: CLIP score needs a local transformers CLIP "
            "folder (config.json, weights, tokenizer and processor files)"
        )

    def load() -> tuple[nn.Module, Any]:
        return _TensorFeatures(CLIPModel.from_pretrained(clip).eval()), CLIPProcessor.from_pretrained(clip)

    metric = CLIPScore(model_name_or_path=load, sync_on_compute=False)
    for i in range(0, len(images), batch_size):
        metric.update(_uint8(images[i : i + batch_size]), prompts[i : i + batch_size])
    return float(metric.compute())
