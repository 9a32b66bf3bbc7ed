"""Weight and config conversion from Hugging Face checkpoints of three LLaMA-family types: LLaMA, Qwen2 (its
q / k / v biases) and Qwen3 (its QK norm). Other model types are refused, not half-loaded.

Our parameter names are LLaMA's, so the conversion is a prefix rename: `model.layers.*` ->
`backbone.layers.*`, `model.norm` -> `backbone.norm`, `model.embed_tokens` -> `embed_tokens`. Loading is
strict: a checkpoint tensor without a place in the backbone, or a backbone tensor the checkpoint lacks, is
an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from mmfusion.errors import UserError, require
from mmfusion.model.config import ROPE_TYPES, ModelConfig

SUPPORTED = {"llama": "LLaMA", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # Hugging Face model_type -> family
TEXT = ("embed_tokens.weight", "lm_head.weight")  # our text parameters outside the backbone
# older LLaMA checkpoints store each layer's rotary frequencies; ours are computed from the rope settings
RECOMPUTED = ".rotary_emb.inv_freq"


def supported_type(model_type: Any, where: str) -> str:
    """`model_type` if it is one of SUPPORTED, else a one-line error naming the supported types."""
    if model_type not in SUPPORTED:
        names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise UserError(f"{where}: model_type {model_type!r} is not supported; supported: {names}")
    return model_type


def read_hf_config(folder: str | Path) -> Any:
    from transformers import AutoConfig

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"--init-from-llm {folder}: no config.json; give a Hugging Face LLaMA / Qwen2 / Qwen3 folder")
    # before AutoConfig, which fails with its own traceback on model types transformers does not know
    supported_type(json.loads(path.read_text()).get("model_type"), f"--init-from-llm {folder}")
    return AutoConfig.from_pretrained(str(folder))


def _refuse_unmapped_settings(hf: Any) -> None:
    """Architecture settings the backbone does not have: refused, never ignored."""
    act = getattr(hf, "hidden_act", "silu")
    require(
        [
            (act == "silu", f"the checkpoint's hidden_act {act!r} is not supported; mmfusion's MLP is SwiGLU (silu)"),
            (
                not getattr(hf, "attention_bias", False),
                "the checkpoint's attention_bias (biases on q, k, v and o) is not supported; "
                "mmfusion has q / k / v biases, for Qwen2",
            ),
            (not getattr(hf, "mlp_bias", False), "the checkpoint's mlp_bias is not supported; mmfusion's MLP has none"),
            (
                not getattr(hf, "use_sliding_window", False),
                "the checkpoint's sliding-window attention (use_sliding_window) is not supported",
            ),
        ]
    )


def _rope_fields(hf: Any) -> dict[str, Any]:
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"the checkpoint's rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    fields: dict[str, Any] = dict(
        rope_type=rope_type, rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    )
    try:
        if rope_type != "default":
            fields.update(rope_factor=float(rope["factor"]))
        if rope_type == "llama3":
            fields.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_context=int(rope["original_max_position_embeddings"]),
            )
    except KeyError as err:
        raise UserError(f"the checkpoint's {rope_type} rope settings lack {err.args[0]!r}") from err
    return fields


def config_from_hf(hf: Any, base: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """A ModelConfig whose backbone matches a transformers LlamaConfig / Qwen2Config / Qwen3Config: `base`
    (default: the defaults) with every backbone field taken from the checkpoint, its image and head fields
    kept. Other model types, and settings the backbone lacks (biases on o or the MLP, sliding windows, an
    activation other than SiLU), are one-line errors."""
    model_type = supported_type(getattr(hf, "model_type", None), "the checkpoint")
    _refuse_unmapped_settings(hf)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    fields = dict(
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        attn_head_dim=head_dim if head_dim * hf.num_attention_heads != hf.hidden_size else None,
        hidden_dim=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        norm_eps=hf.rms_norm_eps,
        qk_norm=model_type == "qwen3",
        qkv_bias=model_type == "qwen2",
        sandwich_norm=False,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **_rope_fields(hf),
    )
    return dataclasses.replace(base or ModelConfig(), **fields, **overrides)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM state dict to MMFusionModel names."""
    out = {}
    for name, tensor in hf_state.items():
        ours = _rename(name)
        if ours is not None:
            out[ours] = tensor
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # tied checkpoints store one copy
    return out


def _rename(name: str) -> str | None:
    if name.startswith("model.embed_tokens."):
        return name.removeprefix("model.")
    if name.startswith("model."):
        return "backbone." + name.removeprefix("model.")
    if name.startswith("lm_head."):
        return name
    return None


def hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise UserError(
        f"{folder} has no model.safetensors (or index): save the Hugging Face model with "
        "save_pretrained(..., safe_serialization=True)"
    )


def _hf_name(ours: str) -> str:
    return "model." + ours.removeprefix("backbone.") if ours != "lm_head.weight" else ours


def _listed(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _targets(names: list[str], params: dict[str, torch.nn.Parameter], hf: Any) -> dict[str, str]:
    """checkpoint name -> our parameter name, for every tensor of the checkpoint. A tensor without a place in
    the backbone is an error naming it and what mmfusion maps; so is a backbone tensor the checkpoint lacks.
    A tied checkpoint (tie_word_embeddings) may store one matrix for embedding and head, or both."""
    family, tied = SUPPORTED[hf.model_type], bool(getattr(hf, "tie_word_embeddings", False))
    model_ties = "lm_head.weight" not in params  # named_parameters lists a shared matrix once
    if model_ties and not tied and "lm_head.weight" in names:
        raise UserError("lm_head.weight: the checkpoint's text head is untied, the model ties it to the embedding")
    redundant = {"lm_head.weight"} if model_ties else set()  # Hugging Face too reads the embedding then
    targets = {n: _rename(n) for n in names if _rename(n) in params}
    unmapped = [n for n in names if n not in targets and n not in redundant and not n.endswith(RECOMPUTED)]
    if unmapped:
        maps = dict.fromkeys(re.sub(r"\.layers\.\d+\.", ".layers.N.", _hf_name(p)) for p in params)
        layers = len({p.split(".")[2] for p in params if p.startswith("backbone.layers.")})
        raise UserError(
            f"{_listed(unmapped)}: not a tensor of a {family} backbone; mmfusion maps "
            f"(N = 0 to {layers - 1}): {', '.join(maps)}"
        )
    missing = sorted({_hf_name(p) for p in params} - set(names) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} tensor(s) of a {family} backbone: {_listed(missing)}")
    return targets


def _copy(name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    """src into dst; only the vocabulary (rows of the embedding / head) may differ in length."""
    vocab = _rename(name) in TEXT
    ok = src.shape[1:] == dst.shape[1:] if vocab else src.shape == dst.shape
    if not ok:
        raise UserError(f"shape mismatch for {name}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}")
    rows = min(src.shape[0], dst.shape[0])
    dst[:rows].copy_(src[:rows])


@torch.no_grad()
def load_hf_backbone(model: torch.nn.Module, folder: str | Path) -> list[str]:
    """Copy a LLaMA / Qwen2 / Qwen3 checkpoint (safetensors, tensor by tensor) into `model`, after checking
    that every checkpoint tensor has its place and every backbone tensor is there (`_targets`). Rows of the
    embedding / LM head beyond the checkpoint's vocabulary (added special tokens) keep their init; a tied
    checkpoint's one matrix fills both. Returns the names of our parameters that were loaded."""
    from safetensors import safe_open

    folder = Path(folder)
    hf = read_hf_config(folder)
    params = {n: p for n, p in model.named_parameters() if n.startswith("backbone.") or n in TEXT}
    files = hf_weight_files(folder)
    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names += list(f.keys())
    targets = _targets(names, params, hf)
    loaded = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in targets:
                    _copy(name, f.get_tensor(name), params[targets[name]])
                    loaded.append(targets[name])
    if "lm_head.weight" in params and "lm_head.weight" not in loaded:  # a tied checkpoint's one matrix
        emb = params["embed_tokens.weight"]
        params["lm_head.weight"][: emb.shape[0]].copy_(emb)
        loaded.append("lm_head.weight")
    return loaded
