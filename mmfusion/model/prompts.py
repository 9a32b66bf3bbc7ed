"""Condition prefixes: what comes before the image tokens, in training and in sampling alike."""

from __future__ import annotations

from mmfusion.model.config import ModelConfig


class Prompts:
    """Condition prefixes: what comes before the image tokens."""

    def __init__(self, model_cfg: ModelConfig, bos: int, boi: int) -> None:
        self.cfg, self.bos, self.boi = model_cfg, bos, boi

    def text(self, caption_ids: list[int] | None) -> list[int]:
        """`<bos> caption <boi>`, or `<bos> <boi>` for the unconditional stream."""
        return [self.bos, *(caption_ids or []), self.boi]

    def classes(self, label: int | None) -> list[int]:
        """Class tokens (repeated) of `label`; None gives the null class (unconditional)."""
        c = self.cfg.num_classes if label is None else int(label)
        base = self.cfg.vocab_size + c * self.cfg.class_tokens
        return list(range(base, base + self.cfg.class_tokens)) * self.cfg.class_repeat
