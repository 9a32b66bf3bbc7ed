"""Small builders shared by the tests."""

import torch

from mmfusion.model.masks import CLEAN, NOISY
from mmfusion.model.sequence import SequenceBuilder, TokenBatch, collate


def text_batch(rows: list[list[int]], token_dim: int = 48) -> TokenBatch:
    return collate([SequenceBuilder(token_dim).text(r).tensors() for r in rows])


def fusion_sample(
    cfg, text: list[int], group_sizes: list[int], caption: list[int] | None = None, seed: int = 0
) -> dict:
    """A CausalFusion training-style sequence with random image tokens and a random order."""
    g = torch.Generator().manual_seed(seed)
    n = sum(group_sizes)
    order = torch.randperm(cfg.num_image_tokens, generator=g)[:n]
    values = torch.randn(n, cfg.image_token_dim, generator=g)
    group = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    b = SequenceBuilder(cfg.image_token_dim).text(text)
    clean_n = n if caption is not None else n - group_sizes[-1]
    b.image(values[:clean_n], order[:clean_n], kind=CLEAN, group=group[:clean_n])
    b.image(values + 0.5, order, kind=NOISY, group=group, t=torch.full((n,), 300))
    b.end_image()
    if caption is not None:
        b.text(caption[:1]).text(caption[1:], loss=True)
    return b.tensors()


def cache_growth(monkeypatch) -> list[int]:  # noqa: ANN001
    """A list that `KVCache.attend` appends a layer to whenever it has to allocate (no buffer yet, too
    small, or of other rows): what a compiled backbone must never trace. `reserve` makes it stay empty."""
    from mmfusion.model.cache import KVCache

    grown: list[int] = []
    original = KVCache.attend

    def attend(self, layer, k, v):  # noqa: ANN001, ANN202
        buf = self.keys[layer]
        if buf is None or buf.shape[2] < self.length + k.shape[2] or buf.shape[0] != k.shape[0]:
            grown.append(layer)
        return original(self, layer, k, v)

    monkeypatch.setattr(KVCache, "attend", attend)
    return grown
