"""Key/value cache for incremental decoding and for the clean prefix of CausalFusion sampling."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values of the tokens already processed, plus which of them are real.

    `valid` (B, T) marks the cached positions that later queries may attend to; padding in a
    batched prefix is cached but never valid. New queries see every valid cached position: the
    cache only ever holds a prefix that all later tokens are allowed to read (the condition, the
    finished clean groups, or the text decoded so far).
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def get(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    def set(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer], self.values[layer] = keys, values

    def extend_valid(self, valid: torch.Tensor) -> None:
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)

    def select(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows in place (beam search, CFG stream duplication)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)
