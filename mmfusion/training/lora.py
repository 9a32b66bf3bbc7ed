"""LoRA adapters on mmfusion models with peft: add, count, save alone (safetensors), merge.

Our projections carry LLaMA's names, so `target_modules` are the usual `q_proj,k_proj,v_proj,o_proj`
(plus `gate_proj,up_proj,down_proj` for the MLP).

New words need their token rows trained too: LoRA leaves `embed_tokens` and `lm_head` frozen, so a token the
base never produced keeps a near-random embedding and a head row that never wins. `token_rows` makes just
those rows (ids) trainable in both, through peft's `trainable_token_indices` (the adapter saves the rows
alone); `--new-tokens modules` trains the two modules whole instead (`modules_to_save`).

`init` chooses how the adapter starts. "lora" is LoRA's own: B = 0, so training starts from the base.
"lora_ga" (LoRA-GA, Wang et al. 2024) starts A and B from the top singular vectors of each weight's
gradient on a few training batches (`gradient_step` runs them), so that the adapter's first steps move
the weights as full fine-tuning's would. "pissa" (PiSSA, Meng et al. 2024) and "olora" (OLoRA) start
them from the principal singular vectors (the QR factors) of each weight. All three subtract the
starting product from the frozen weight, so the model's function is unchanged at the start; since their
frozen weights then differ from the base's, `save_as_plain_lora` rewrites such an adapter as the plain
LoRA of rank 2r that gives the same weights on the untouched base: it then loads, stacks and merges like
any other adapter.

`weight_space_training` runs each adapted projection as one product with its merged weight, W + s B A,
while training, instead of peft's two extra products beside W. The function and the gradients of A and B
are the same (the chain rule through W + s B A); on a small model the rank-r products, skinny and many,
cost more than they compute, so the adapter trained slower per step than full fine-tuning
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.loraga import preprocess_loraga
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from mmfusion.errors import UserError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# a CausalFusion model's image input projection and image head (the head MLP's first layer, where it has
# one): adaptable on request, not by default (docs/experiments.md, the downstream benchmark)
IMAGE = ("image_in", "image_head_mlp.0", "image_head")
INITS = {"lora": True, "lora_ga": "lora_ga", "pissa": "pissa", "olora": "olora"}  # peft's init_lora_weights


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = ATTENTION,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
    token_rows: Sequence[int] | None = None,
    init: str = "lora",
    gradient_step: Callable[[], None] | None = None,
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters started as `init` says (see the module docstring); only they
    (and `modules_to_save`, and the rows `token_rows` of `embed_tokens` and `lm_head`) stay trainable.
    `gradient_step` (LoRA-GA) runs the training loss's backward over the batches to estimate from."""
    if init not in INITS:
        raise UserError(f"unknown LoRA init {init!r}; choose from {', '.join(INITS)}")
    if init == "lora_ga" and gradient_step is None:
        raise UserError("LoRA-GA needs training batches to estimate the gradients from (gradient_step)")
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
        init_lora_weights=INITS[init],
        lora_ga_config=LoraGAConfig() if init == "lora_ga" else None,
    )
    if init == "lora_ga":  # each target weight's gradient, averaged over the batches, for its init
        preprocess_loraga(model, cfg, gradient_step)
    return get_peft_model(model, cfg)


def initial_factors(model: PeftModel) -> dict[str, torch.Tensor] | None:
    """Copies of the adapter's A and B as they start, for an init that moves the frozen weights (LoRA-GA,
    PiSSA, OLoRA); None for LoRA's own init, which leaves the base as it is."""
    if model.peft_config["default"].init_lora_weights is True:
        return None
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items() if ".lora_" in k}


def save_as_plain_lora(folder: str | Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite the adapter saved in `folder`, trained from the factors `initial` (A0, B0) on weights that
    had B0 A0 taken out, as the plain LoRA that gives the same weights on the untouched base: the weight
    change is B A - B0 A0 = [B, -B0] [A; A0], rank 2r at the same scale (alpha doubles with r). Everything
    else in the adapter (token rows, whole modules) is kept as it is: peft's own conversion (`save_pretrained`
    with `path_initial_model_for_weight_conversion`) keeps only the A and B tensors and would drop them."""
    folder = Path(folder)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key, value in tensors.items():
        if ".lora_A." in key:
            tensors[key] = torch.cat([value, initial[key]], dim=0)
        elif ".lora_B." in key:
            tensors[key] = torch.cat([value, -initial[key]], dim=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(r=2 * config["r"], lora_alpha=2 * config["lora_alpha"], init_lora_weights=True)
    config_path.write_text(json.dumps(config, indent=2))


def _weight_space_forward(self: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """A plain LoRA projection as one product: x (W + s B A)^T + b, with s B A as peft's merge computes it.
    Takes the input alone: peft's per-call options (`adapter_names` ...) have no meaning here."""
    delta = self.get_delta_weight(self.active_adapters[0])
    return F.linear(x, self.base_layer.weight + delta, self.base_layer.bias)


def _plain(layer: LoraLinear) -> bool:
    """One active LoRA adapter with no dropout, variant (DoRA ...), bias or transposed weight, unmerged."""
    names = layer.active_adapters
    return (
        len(names) == 1
        and names[0] in layer.lora_A
        and not (layer.merged or layer.disable_adapters or layer.fan_in_fan_out or layer.lora_variant)
        and isinstance(layer.lora_dropout[names[0]], nn.Identity)
        and layer.lora_B[names[0]].bias is None
        and isinstance(layer.base_layer, nn.Linear)
    )


@contextlib.contextmanager
def weight_space_training(model: nn.Module) -> Iterator[int]:
    """Within the block, every plain LoRA projection of `model` computes with its merged weight (see the
    module docstring); yields how many do. Adapters stay unmerged: saving, merging and switching them work
    as before, and leaving the block restores peft's own forward."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and _plain(m)]
    for layer in layers:
        layer.forward = types.MethodType(_weight_space_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
