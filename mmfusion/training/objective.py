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
from mmfusion.diffusion.layout import BatchLayout
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.prompts import Prompts
from mmfusion.model.sequence import BatchRows, SequenceBuilder, TokenBatch, collate, pack, select_rows
from mmfusion.model.token_shuffle import fuse_grid, per_code_loss


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
        self._loss, self.compiled, self._cold = self._loss_terms, False, False  # see `compile`, `warm_up`
        self.layout = None  # whole-batch layout: continuous tokens under a text condition
        if not model_cfg.discrete and objective.condition == "text":
            grid, span, clean_last = model_cfg.image_grid, model_cfg.image_span, not self.text_sees_noisy
            self.layout = BatchLayout(self.diffusion, self.scheduler, grid, self.prompts, (eos, eoi), span, clean_last)

    @property
    def text_sees_noisy(self) -> bool:
        return self.obj.baseline == "transfusion"

    def build(
        self,
        tokens: torch.Tensor,
        captions: list[list[int]] | None = None,
        labels: list[int] | None = None,
        generators: torch.Generator | list[torch.Generator] | None = None,
    ) -> TokenBatch:
        """A training batch from image tokens (B, N, C) -- or, on the discrete path, code grids
        (B, h, w) -- and captions (token ids) or class labels. `generators`: one per sample (or one
        shared by all) for the random choices of the objective. Laid out for the whole batch at once
        where `BatchLayout` covers the configuration, else one sample at a time: the same batch."""
        generators = self._per_sample(generators, tokens.shape[0])
        if self.layout is None:
            return self.build_per_sample(tokens, captions, labels, generators)
        draws = self.layout.draw(generators, tokens.shape[1], tokens.shape[2], captions, self.obj)
        return self.layout.build(tokens, draws, self.obj.pack_length)

    @staticmethod
    def _per_sample(generators: torch.Generator | list[torch.Generator] | None, n: int) -> list[torch.Generator]:
        if isinstance(generators, list):
            return generators
        shared = generators or torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
        return [shared] * n

    def build_per_sample(
        self,
        tokens: torch.Tensor,
        captions: list[list[int]] | None = None,
        labels: list[int] | None = None,
        generators: torch.Generator | list[torch.Generator] | None = None,
    ) -> TokenBatch:
        """`build`, one sample at a time through `SequenceBuilder`: every configuration (Token-Shuffle
        codes, class conditions), and the reference the whole-batch layout is tested against."""
        generators = self._per_sample(generators, tokens.shape[0])
        if self.model_cfg.discrete:
            tokens = fuse_grid(tokens.long(), self.model_cfg.shuffle)  # (B, N', s^2)
        rows = []
        for i in range(tokens.shape[0]):
            g = generators[i]
            u = torch.rand(2, generator=g).tolist()
            b = self.builder(tokens.shape[-1])
            if self.obj.condition == "class":
                drop = u[1] < self.obj.caption_dropout
                b.text(self.prompts.classes(None if drop else labels[i]), prompt=True)
                self._image(b, tokens[i], g, caption_order=False)
            elif u[0] < self.obj.t2i_fraction:
                drop = u[1] < self.obj.caption_dropout
                b.text(self.prompts.text(None if drop else captions[i]), prompt=True)
                self._image(b, tokens[i], g, caption_order=False)
            else:
                b.text(self.prompts.text(None), prompt=True)
                self._image(b, tokens[i], g, caption_order=True, weight=self.obj.caption_image_loss_weight)
                b.text([self.eoi]).text([*captions[i], self.eos], loss=True)
            rows.append(b.tensors())
        return pack(rows, self.obj.pack_length) if self.obj.pack_length else collate(rows)

    def builder(self, token_dim: int) -> SequenceBuilder:
        cfg = self.model_cfg
        if cfg.discrete:
            return SequenceBuilder(0, code_width=cfg.code_width)
        return SequenceBuilder(token_dim, image_span=cfg.image_span)

    def _image(
        self, b: SequenceBuilder, tokens: torch.Tensor, g: torch.Generator, caption_order: bool, weight: float = 1.0
    ) -> None:
        if self.model_cfg.discrete:  # plain next-token prediction over fused code tokens
            inputs = self._self_correction(tokens, g)
            b.codes(tokens, torch.arange(tokens.shape[0]), loss_weight=weight, inputs=inputs)
            return
        clean_last = caption_order and not self.text_sees_noisy
        add_image(
            b,
            tokens,
            self.diffusion,
            self.scheduler,
            self.model_cfg.image_grid,
            g,
            clean_copy_of_last=clean_last,
            ar_steps=self.obj.caption_steps(tokens.shape[0]) if caption_order else None,
            loss_scale=weight,
        )

    def _self_correction(self, codes: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
        """Infinity's bitwise self-correction: flip a fraction of the input bits; targets stay true."""
        p, d = self.obj.bit_flip, self.model_cfg.code_bits
        if not (p and d):
            return None
        flips = torch.rand((*codes.shape, d), generator=g) < p
        return codes ^ (flips.long() * (2 ** torch.arange(d))).sum(-1)

    def loss(self, model: MMFusionModel, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """Weighted image loss (diffusion regression, or code cross-entropy) plus the weighted text loss.
        A term the batch has nothing for (no caption-order sample, no noisy token) is left out of the
        dict rather than given as 0, so that the logs do not read "text loss 0" for a small batch that
        had no caption to learn from. The rows of each kind of token are found first, outside the
        (possibly compiled) forward and losses."""
        rows = BatchRows.of(batch, codes=self.model_cfg.discrete, losses=True)
        return self._loss(model, batch, rows)

    def compile(self) -> None:
        """Compile the forward pass and the losses as one graph (dynamic shapes), the transformer inside
        it: the embeddings, mask, heads and losses fuse with it, and the backward is one compiled node
        rather than a graph of small eager ones. The model's weights and files are untouched."""
        self._loss = torch.compile(self._loss_terms, dynamic=True)
        self.compiled = self._cold = True

    def warm_up(self, model: MMFusionModel, batch: TokenBatch) -> None:
        """Once after `compile` (a no-op otherwise and after that), compile the step for `batch` and for
        its first half of rows, before it trains. Inductor makes
        some kernels differently above and below a size (a float sum over more than 4,096 values adds
        up in chunks), and a batch on the other side of it compiles again: in a data-parallel run, one
        process at a time, mid-run, with the others waiting. Packed batches vary by a few rows around
        the batch's mean, so compiling both sizes at the start spares that. The gradients are taken
        and dropped (`torch.autograd.grad`): no weight, `.grad` or data-parallel hook is touched."""
        if not self._cold:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for rows in (len(batch), max(1, len(batch) // 2)):
            part = batch.map(lambda v: v[:rows])  # noqa: B023 (used at once)
            torch.autograd.grad(self.loss(model, part)["loss"], params, allow_unused=True)
        self._cold = False

    def _loss_terms(self, model: MMFusionModel, batch: TokenBatch, rows: BatchRows) -> dict[str, torch.Tensor]:
        mask = batch.mask(self.text_sees_noisy, self.model_cfg.bidirectional_prompt)
        hidden = model(batch, mask=mask, rows=rows)
        out: dict[str, torch.Tensor] = {}
        if self.model_cfg.discrete and rows.noisy.numel():
            out["image_loss"] = self._code_loss(model, hidden, batch, rows.noisy)
        elif rows.noisy.numel():
            pred = model.image_output(select_rows(hidden, rows.noisy))
            mse = (pred - select_rows(batch.targets, rows.noisy).to(pred.dtype)).pow(2).mean(-1)
            out["image_loss"] = (mse * select_rows(batch.weights, rows.noisy)).sum() / rows.noisy.shape[0]
        if rows.text.numel():
            logits = model.text_logits(select_rows(hidden, rows.text))
            out["text_loss"] = F.cross_entropy(logits.float(), select_rows(batch.labels, rows.text))
        if not out:  # nothing to learn from: a zero loss still tied to the graph
            return {"loss": hidden.sum() * 0.0}
        out["loss"] = out.get("image_loss", 0.0) + self.obj.text_loss_weight * out.get("text_loss", 0.0)
        return out

    def _code_loss(
        self, model: MMFusionModel, hidden: torch.Tensor, batch: TokenBatch, rows: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy over all s^2 codes of the next fused token (bitwise: binary CE over the d bits),
        at the flat rows `rows` of the tokens with an image loss."""
        target = select_rows(batch.code_labels, rows)  # (n, W)
        logits = model.code_logits(select_rows(hidden, rows), codes=target).float()  # (n, W, K) or (n, W, d)
        per_code = per_code_loss(logits, target, self.model_cfg.code_bits if model.shuffle_out.bitwise else 0)
        return (per_code.mean(-1) * select_rows(batch.weights, rows)).sum() / len(rows)
