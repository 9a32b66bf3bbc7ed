"""The joint T2I + captioning objective over CausalFusion image tokens (SPEC sections 3 and 4).

Per sample, with probability `t2i_fraction`: T2I order `<bos> caption <boi> [image]` with the image
loss only, the caption dropped at rate `caption_dropout` (the unconditional stream for CFG).
Otherwise caption order `<bos> <boi> [image] <eoi> caption <eos>`: the image loss (no text before the
image, so unconditional) plus the text loss x `text_loss_weight`. In class mode the condition is the
class tokens (or the null class), and there is no captioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.causal import add_image
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import IGNORE, SequenceBuilder, TokenBatch, collate


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


class JointObjective:
    def __init__(
        self,
        model_cfg: ModelConfig,
        diffusion: DiffusionConfig,
        objective: ObjectiveConfig,
        bos: int,
        eos: int,
        boi: int,
        eoi: int,
    ) -> None:
        self.model_cfg, self.diffusion, self.obj = model_cfg, diffusion, objective
        self.eos, self.eoi = eos, eoi
        self.prompts = Prompts(model_cfg, bos, boi)
        self.scheduler = diffusion.make_scheduler("ddpm")
        if objective.baseline == "transfusion":
            # Transfusion: one AR step, no clean copy for T2I; the caption reads the noisy image
            self.diffusion = DiffusionConfig(**{**diffusion.to_dict(), "gamma": 0.0, "ar_weight": 1.0, "k_times": 1})
        elif objective.baseline != "causalfusion":
            raise ValueError(f"baseline must be causalfusion or transfusion, got {objective.baseline!r}")

    @property
    def text_sees_noisy(self) -> bool:
        return self.obj.baseline == "transfusion"

    def build(
        self,
        tokens: torch.Tensor,
        captions: list[list[int]] | None = None,
        labels: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenBatch:
        """A training batch from image tokens (B, N, C) and captions (token ids) or class labels."""
        g = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
        rows = []
        for i in range(tokens.shape[0]):
            u = torch.rand(2, generator=g).tolist()
            b = SequenceBuilder(tokens.shape[-1], image_span=self.model_cfg.image_span)
            if self.obj.condition == "class":
                drop = u[1] < self.obj.caption_dropout
                b.text(self.prompts.classes(None if drop else labels[i]))
                self._image(b, tokens[i], g, caption_order=False)
            elif u[0] < self.obj.t2i_fraction:
                drop = u[1] < self.obj.caption_dropout
                b.text(self.prompts.text(None if drop else captions[i]))
                self._image(b, tokens[i], g, caption_order=False)
            else:
                b.text(self.prompts.text(None))
                self._image(b, tokens[i], g, caption_order=True, weight=self.obj.caption_image_loss_weight)
                b.text([self.eoi]).text([*captions[i], self.eos], loss=True)
            rows.append(b.tensors())
        return collate(rows)

    def _image(
        self, b: SequenceBuilder, tokens: torch.Tensor, g: torch.Generator, caption_order: bool, weight: float = 1.0
    ) -> None:
        clean_last = caption_order and not self.text_sees_noisy
        add_image(
            b,
            tokens,
            self.diffusion,
            self.scheduler,
            self.model_cfg.image_grid,
            g,
            clean_copy_of_last=clean_last,
            loss_scale=weight,
        )

    def loss(self, model: MMFusionModel, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """Weighted diffusion loss on noisy tokens plus the weighted text loss."""
        hidden = model(batch, mask=batch.mask(self.text_sees_noisy))
        out: dict[str, torch.Tensor] = {}
        noisy = batch.weights > 0
        zero = hidden.sum() * 0.0
        if noisy.any():
            pred = model.image_output(hidden[noisy])
            mse = (pred - batch.targets[noisy].to(pred.dtype)).pow(2).mean(-1)
            out["image_loss"] = (mse * batch.weights[noisy]).sum() / noisy.sum()
        else:
            out["image_loss"] = zero
        has_text = batch.labels != IGNORE
        if has_text.any():
            logits = model.text_logits(hidden[has_text])
            out["text_loss"] = F.cross_entropy(logits.float(), batch.labels[has_text])
        else:
            out["text_loss"] = zero
        out["loss"] = out["image_loss"] + self.obj.text_loss_weight * out["text_loss"]
        return out
