"""Caption candidates checked against the image by the model's other direction.

A joint model reads an image (captioning) and draws one from a caption (T2I). Beam search proposes
captions by the first; `redraw_error` asks the second how well each proposal explains the image: the
error of the model's image prediction for that image under that caption, lower for a caption that says
what the image shows. On two-object scenes the caption head often names the right objects with the
wrong relation while the T2I direction tells the relations apart (docs/how-it-works.md, "Captions
checked by drawing"), so `rerank` scores a candidate by its log-probability minus `weight` x its error.

- CausalFusion images: the mean squared error of the model's x0 / noise / v prediction (its training
  target) over the image's tokens, at `timesteps` noise levels spread over (0.1 T, 0.9 T), one AR step,
  the same noise for every candidate and every image, so that a score depends on the image and the
  caption alone.
- Token-Shuffle codes: the mean cross-entropy of the image's codes given the caption (nats per code).
"""

from __future__ import annotations

import torch

from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.diffusion.layout import BatchLayout, Draws
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.prompts import Prompts
from mmfusion.model.sequence import SequenceBuilder, collate, row_index, select_rows
from mmfusion.model.token_shuffle import fuse_grid, per_code_loss

NOISE_SEED = 0  # the noise every candidate is judged under


def redraw_error(
    model: MMFusionModel,
    prompts: Prompts,
    diffusion: DiffusionConfig,
    tokens: torch.Tensor,
    captions: list[list[int]],
    timesteps: int = 8,
    ends: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """(B,) error of the model's T2I prediction of image `tokens[i]` (B, N, C), or code grid (B, h, w),
    under caption `captions[i]` (ids without specials); lower: the caption explains the image better.
    `ends`: the ids of `<eos>` and `<eoi>` (the layout's; no text follows the image here)."""
    if model.cfg.discrete:
        return _code_error(model, prompts, tokens, captions)
    b, n, c = tokens.shape
    cfg = DiffusionConfig(**{**diffusion.to_dict(), "k_times": timesteps})
    scheduler = cfg.make_scheduler("ddpm")
    total = scheduler.config.num_train_timesteps
    layout = BatchLayout(cfg, scheduler, model.cfg.image_grid, prompts, ends, model.cfg.image_span, True)
    noise = torch.randn((1, timesteps, n, c), generator=torch.Generator().manual_seed(NOISE_SEED))
    t = (torch.linspace(0.1, 0.9, timesteps) * total).long().clamp(max=total - 1)
    draws = Draws(
        prompts=[prompts.text(ids) for ids in captions],
        tails=[[] for _ in captions],
        sizes=[[n] for _ in captions],  # one AR step: every token noisy, conditioned on the caption alone
        scales=[1.0] * b,
        orders=torch.arange(n).expand(b, n),
        t=t.view(1, timesteps, 1).expand(b, timesteps, n),
        noise=noise.expand(b, timesteps, n, c),
    )
    batch = layout.build(tokens.float().cpu(), draws, 0)
    hidden = model(batch)
    noisy = row_index(batch.weights > 0)
    pred = model.image_output(select_rows(hidden, noisy)).float().cpu()
    target = select_rows(batch.targets, noisy).float()
    return (pred - target).pow(2).mean(-1).view(b, timesteps * n).mean(-1)


def _code_error(model: MMFusionModel, prompts: Prompts, grids: torch.Tensor, captions: list[list[int]]) -> torch.Tensor:
    """(B,) mean cross-entropy of each code grid's codes after its caption (T2I order)."""
    cfg = model.cfg
    fused = fuse_grid(grids.long().cpu(), cfg.shuffle)
    rows = [
        SequenceBuilder(0, code_width=cfg.code_width)
        .text(prompts.text(ids), prompt=True)
        .codes(x, torch.arange(len(x)), loss_weight=1.0)
        .tensors()
        for x, ids in zip(fused, captions)
    ]
    batch = collate(rows)
    hidden = model(batch)
    scored = batch.weights > 0
    at = row_index(scored)
    target = select_rows(batch.code_labels, at)
    logits = model.code_logits(select_rows(hidden, at), codes=target.to(hidden.device)).float().cpu()
    per_token = per_code_loss(logits, target, cfg.code_bits if model.shuffle_out.bitwise else 0).mean(-1)
    owner = at // batch.kind.shape[1]
    return torch.zeros(len(rows)).index_add(0, owner, per_token) / torch.bincount(owner, minlength=len(rows))


def rerank(candidates: list[list[tuple[float, list[int]]]], errors: torch.Tensor, weight: float) -> list[list[int]]:
    """The best candidate of each image by log-probability - `weight` x redraw error. `candidates`: per
    image, (score, ids) pairs; `errors`: their redraw errors, flat in the same order."""
    out, at = [], 0
    for ranked in candidates:
        scores = [score - weight * float(errors[at + j]) for j, (score, _) in enumerate(ranked)]
        out.append(ranked[max(range(len(ranked)), key=scores.__getitem__)][1])
        at += len(ranked)
    return out
