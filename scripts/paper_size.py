"""The paper-size configs are real: build CausalFusion-L (and XL), count parameters beside the paper's,
and run one forward + backward of L on a 256 x 256 image (batch 1) on CPU, reporting time and peak memory.

    python scripts/paper_size.py [--xl]

The image is a 256 x 256 batch of 1 as the SD VAE (f8, 4 channels) sees it: 32 x 32 x 4 latents,
patch 2 -> 256 tokens of 16 channels; class-conditional with 64 class tokens and 1000 classes, as in
the paper's system-level CausalFusion-L (368M parameters).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.training.objective import JointObjective

PAPER = {"L": 368e6, "XL": 676e6}


def build(name: str) -> MMFusionModel:
    cfg = ModelConfig.from_name(name, vocab_size=8, num_classes=1000, class_tokens=64, class_repeat=1)
    return MMFusionModel(cfg)


def forward_backward(model: MMFusionModel) -> dict:
    cfg = model.cfg
    obj = JointObjective(cfg, DiffusionConfig(), ObjectiveConfig(condition="class"), 1, 2, 3, 4)
    latents = torch.randn(1, cfg.num_image_tokens, cfg.image_token_dim)  # 256 px through an f8 VAE, patch 2
    batch = obj.build(latents, None, [7], torch.Generator().manual_seed(0))
    start = time.perf_counter()
    loss = obj.loss(model, batch)["loss"]
    loss.backward()
    return {"sequence_length": batch.kind.shape[1], "loss": loss.item(), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xl", action="store_true", help="also count XL's parameters")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {}
    for name in ("L", "XL") if args.xl else ("L",):
        model = build(name)
        n = model.num_parameters()
        report[name] = {"parameters": n, "paper": PAPER[name], "ratio": n / PAPER[name]}
        print(f"CausalFusion-{name}: {n / 1e6:.1f}M parameters (paper: {PAPER[name] / 1e6:.0f}M)")
        if name == "L":
            report[name].update(forward_backward(model))
        del model
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
