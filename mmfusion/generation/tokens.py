"""Autoregressive sampling of discrete image codes (Token-Shuffle path) with a KV cache.

One fused token (s x s codes) per step, raster order. Each of its s^2 codes is drawn with
temperature, top-k and top-p (softmax heads), or bit by bit (bitwise heads). Classifier-free
guidance mixes conditional and unconditional logits with a scale that may change over the token
index (Token-Shuffle's CFG scheduler): constant, a linear ramp or a cosine ramp from 1 to the scale.
"""

from __future__ import annotations

import math

import torch

from mmfusion.generation.common import guide, guided_prefixes, inference
from mmfusion.generation.settings import TokenSampling
from mmfusion.model.cache import KVCache
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import SequenceBuilder, code_step, collate
from mmfusion.model.token_shuffle import unfuse_grid


def cfg_scale_at(schedule: str, scale: float, index: int, total: int) -> float:
    """Guidance scale for token `index` of `total`: constant, or ramping from 1 up to `scale`."""
    if schedule == "constant" or total <= 1:
        return scale
    frac = index / (total - 1)
    ramp = frac if schedule == "linear" else (1 - math.cos(math.pi * frac)) / 2
    return 1.0 + (scale - 1.0) * ramp


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set with probability mass >= top_p; -inf elsewhere."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


class ARImageSampler:
    def __init__(self, model: MMFusionModel, settings: TokenSampling = TokenSampling()) -> None:
        self.model, self.settings = model, settings

    def _draw(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """logits (B, W, K) -> codes (B, W); bitwise heads: (B, W, d) bit logits -> integer codes."""
        s = self.settings
        t = max(s.temperature, 1e-6)
        out = []
        if self.model.shuffle_out.bitwise:
            probs = torch.sigmoid(logits / t)
            d = probs.shape[-1]
            for p, g in zip(probs, generators):
                bits = torch.rand(p.shape, generator=g) < p
                out.append((bits.long() * 2 ** torch.arange(d)).sum(-1))
            return torch.stack(out)
        probs = filter_logits(logits / t, s.top_k, s.top_p).softmax(-1)
        for p, g in zip(probs, generators):
            out.append(torch.multinomial(p, 1, generator=g).squeeze(-1))
        return torch.stack(out)

    @inference
    def __call__(
        self,
        conds: list[list[int]],
        unconds: list[list[int]] | None = None,
        generators: list[torch.Generator] | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Code grids (B, h, w) for condition prefixes ending in <boi>."""
        cfg = self.model.cfg
        b = len(conds)
        s = self.settings
        guided = s.cfg_scale != 1.0
        prefixes, generators = guided_prefixes(conds, unconds, generators, guided)
        n = cfg.num_image_tokens
        width = cfg.code_width
        fused = torch.zeros(b, n, width, dtype=torch.long)
        cache = self.model.new_cache() if use_cache else None
        hidden = self._next(prefixes, fused[:, :0], cache)
        for i in range(n):
            scale = cfg_scale_at(s.cfg_schedule, s.cfg_scale, i, n) if guided else None
            fused[:, i] = self._draw_window(hidden, scale, generators)
            if i + 1 < n:
                hidden = self._next(prefixes, fused[:, : i + 1], cache)
        h, w = cfg.image_grid
        return unfuse_grid(fused, cfg.shuffle, (h * cfg.shuffle, w * cfg.shuffle))

    def _draw_window(
        self, hidden: torch.Tensor, scale: float | None, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """The s^2 codes (B, W) of the next fused token from its hidden states (B rows, or 2B with the
        unconditional rows after the conditional ones when `scale` is set): all at once, or one slot
        after another with the autoregressive window head."""
        b = len(generators)

        def logits_of(codes: torch.Tensor | None) -> torch.Tensor:
            if codes is not None:
                codes = torch.cat([codes] * (hidden.shape[0] // b)).to(hidden.device)
            logits = self.model.code_logits(hidden, codes).float().cpu()  # drawn on the CPU, seeded there
            return logits if scale is None else guide(logits, b, scale)

        if not self.model.shuffle_out.autoregressive:
            return self._draw(logits_of(None), generators)
        codes = torch.zeros(b, self.model.cfg.code_width, dtype=torch.long)
        for j in range(codes.shape[1]):
            codes[:, j : j + 1] = self._draw(logits_of(codes)[:, j : j + 1], generators)
        return codes

    def _next(self, prefixes: list[list[int]], done: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Hidden states (rows, dim) that predict the next fused token, from the prefix plus the `done`
        tokens (B, i, W)."""
        rows = len(prefixes)
        codes = torch.cat([done] * (rows // len(done))) if len(done) else done
        width = self.model.cfg.code_width
        if cache is None:  # reference path: the whole sequence every time
            samples = [
                SequenceBuilder(0, code_width=width)
                .text(p, prompt=True)
                .codes(codes[r], torch.arange(codes.shape[1]))
                .tensors()
                for r, p in enumerate(prefixes)
            ]
            batch = collate(samples)
            last = torch.tensor([len(p) + codes.shape[1] - 1 for p in prefixes])
        elif done.shape[1] == 0:
            batch = collate([SequenceBuilder(0, code_width=width).text(p, prompt=True).tensors() for p in prefixes])
            last = torch.tensor([len(p) - 1 for p in prefixes])
        else:
            i = done.shape[1] - 1
            batch = code_step(codes[:, i], i, torch.tensor([len(p) + i for p in prefixes]))
            last = torch.zeros(rows, dtype=torch.long)
        hidden = self.model(batch, cache, store=cache is not None)
        return hidden[torch.arange(rows, device=hidden.device), last.to(hidden.device)]
