"""LoRA adapters on mmfusion models with peft: add, count, save alone (safetensors), merge.

Our projections carry LLaMA's names, so `target_modules` are the usual `q_proj,k_proj,v_proj,o_proj`
(plus `gate_proj,up_proj,down_proj` for the MLP).

New words need their token rows trained too: LoRA leaves `embed_tokens` and `lm_head` frozen, so a token the
base never produced keeps a near-random embedding and a head row that never wins. `token_rows` makes just
those rows (ids) trainable in both, through peft's `trainable_token_indices` (the adapter saves the rows
alone); `--new-tokens modules` trains the two modules whole instead (`modules_to_save`).
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from mmfusion.errors import UserError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# a CausalFusion model's image input projection and image head (the head MLP's first layer, where it has
# one): adaptable on request, not by default (docs/experiments.md, the downstream benchmark)
IMAGE = ("image_in", "image_head_mlp.0", "image_head")


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = ATTENTION,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
    token_rows: Sequence[int] | None = None,
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only they (and `modules_to_save`, and the rows `token_rows` of
    `embed_tokens` and `lm_head`) stay trainable."""
    if r < 1 or alpha <= 0:
        raise UserError(f"LoRA needs a rank of at least 1 and a positive alpha, got r={r}, alpha={alpha}")
    unknown = [t for t in targets if t not in ATTENTION + MLP + IMAGE]
    if unknown:
        raise UserError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(ATTENTION + MLP + IMAGE)}")
    rows = None
    if token_rows:
        if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
            # peft would give the embedding and the head separate rows: the tie would not hold
            raise UserError("trainable token rows need an untied text head; use --new-tokens modules or off")
        ids = sorted({int(i) for i in token_rows})
        rows = {"embed_tokens": ids, "lm_head": ids}
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        trainable_token_indices=rows,
    )
    return get_peft_model(model, cfg)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
