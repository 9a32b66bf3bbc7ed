"""Key/value cache for incremental decoding and for the clean prefix of CausalFusion sampling."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values of the tokens already processed, plus which of them are real.

    Buffers grow by doubling, and new keys / values are written in place after the stored ones: a
    step costs no copy of the prefix. A forward pass that does not `store` (a denoising step of the
    current group) writes its keys past the stored length, where the next pass overwrites them.

    `valid` (B, T) marks the cached positions that later queries may attend to; padding in a batched
    prefix is cached but never valid. New queries see every valid cached position: the cache only
    ever holds a prefix that all later tokens may read (the condition, finished clean groups, or the
    text decoded so far).
    """

    def __init__(self, n_layers: int, kv_heads: int = 0, head_dim: int = 0) -> None:
        self.kv_heads, self.head_dim = kv_heads, head_dim  # the buffers' shape, for `reserve`
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid: torch.Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, n, D) after the stored tokens; return all keys / values so far."""
        end = self.length + k.shape[2]
        self._room(layer, end, k, k.shape[1], k.shape[3])  # nothing to do after `reserve`
        buf_k, buf_v = self.keys[layer], self.values[layer]
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def reserve(self, like: torch.Tensor, n: int) -> None:
        """Make room for `n` more tokens in every layer before a pass (rows, dtype and device as `like`),
        so that `attend` inside the pass never allocates: a compiled pass then has no branch on the
        cache's size. A cache made without its buffers' shape (`kv_heads`) leaves it to `attend`."""
        if not self.kv_heads:
            return
        for layer in range(len(self.keys)):
            self._room(layer, self.length + n, like, self.kv_heads, self.head_dim)

    def _room(self, layer: int, end: int, like: torch.Tensor, heads: int, head_dim: int) -> None:
        """Buffers for `layer` that hold `end` tokens of `like`'s rows, dtype and device (`heads` x
        `head_dim` each): grown by doubling, the stored tokens copied over."""
        buf_k = self.keys[layer]
        if (
            buf_k is not None
            and buf_k.shape[2] >= end
            and buf_k.shape[0] == like.shape[0]
            and buf_k.dtype == like.dtype
        ):
            return
        capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), 16)
        shape = (like.shape[0], heads, capacity, head_dim)
        new_k, new_v = like.new_empty(shape), like.new_empty(shape)
        if buf_k is not None and self.length:
            new_k[:, :, : self.length] = buf_k[:, :, : self.length]
            new_v[:, :, : self.length] = self.values[layer][:, :, : self.length]
        self.keys[layer], self.values[layer] = new_k, new_v

    def commit(self, valid: torch.Tensor) -> None:
        """Keep the tokens of the last pass (`valid` (B, n): which of them later tokens may read)."""
        self.length += valid.shape[1]
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)

    def rows(self, n: int) -> KVCache:
        """A view of the first `n` batch rows (the conditional stream), for passes that do not store."""
        view = KVCache(len(self.keys), self.kv_heads, self.head_dim)
        view.keys = [None if k is None else k[:n] for k in self.keys]
        view.values = [None if v is None else v[:n] for v in self.values]
        view.valid = None if self.valid is None else self.valid[:n]
        view.length = self.length
        return view

    def select(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows in place (beam search, CFG stream duplication)."""
        stored = next((k for k in self.keys if k is not None), self.valid)
        if stored is not None:
            index = index.to(stored.device)
        self.keys = [None if k is None else k[:, :, : self.length].index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v[:, :, : self.length].index_select(0, index) for v in self.values]
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)
