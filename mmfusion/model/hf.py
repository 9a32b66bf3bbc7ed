"""Weight and config conversion from Hugging Face LLaMA-family checkpoints (LLaMA, Qwen3).

Our parameter names are LLaMA's, so the conversion is a prefix rename: `model.layers.*` ->
`backbone.layers.*`, `model.norm` -> `backbone.norm`, `model.embed_tokens` -> `embed_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mmfusion.errors import UserError
from mmfusion.model.config import ROPE_TYPES, ModelConfig


def read_hf_config(folder: str | Path) -> Any:
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"--init-from-llm {folder}: no config.json; give a Hugging Face LLaMA / Qwen3 model folder")
    return AutoConfig.from_pretrained(str(folder))


def config_from_hf(hf: Any, base: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """A ModelConfig whose backbone matches a transformers LlamaConfig / Qwen3Config: `base` (default: the
    defaults) with every backbone field taken from the checkpoint, its image and head fields kept."""
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"the checkpoint's rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    scaling: dict[str, Any] = dict(rope_type=rope_type)
    try:
        if rope_type != "default":
            scaling.update(rope_factor=float(rope["factor"]))
        if rope_type == "llama3":
            scaling.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_context=int(rope["original_max_position_embeddings"]),
            )
    except KeyError as err:
        raise UserError(f"the checkpoint's {rope_type} rope settings lack {err.args[0]!r}") from err
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
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        qk_norm=hf.model_type.startswith("qwen3"),
        sandwich_norm=False,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **scaling,
    )
    return dataclasses.replace(base or ModelConfig(), **fields, **overrides)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LlamaForCausalLM / Qwen3ForCausalLM state dict to MMFusionModel names."""
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


@torch.no_grad()
def load_hf_backbone(model: torch.nn.Module, folder: str | Path) -> list[str]:
    """Copy a LLaMA-family checkpoint (safetensors, tensor by tensor) into `model`; rows of the
    embedding / LM head beyond the checkpoint's vocabulary (added special tokens) keep their init.
    Returns the names of our parameters that were loaded."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    loaded, tied = [], False
    for file in hf_weight_files(Path(folder)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                ours = _rename(name)
                if ours is None or ours not in params:
                    continue
                src, dst = f.get_tensor(name), params[ours]
                rows = min(src.shape[0], dst.shape[0])
                if src.shape[1:] != dst.shape[1:]:
                    raise UserError(
                        f"shape mismatch for {name}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}"
                    )
                dst[:rows].copy_(src[:rows])
                loaded.append(ours)
                tied |= ours == "embed_tokens.weight"
    if "lm_head.weight" not in loaded and tied and "lm_head.weight" in params:
        emb = params["embed_tokens.weight"]
        params["lm_head.weight"][: emb.shape[0]].copy_(emb)  # tied checkpoints store one matrix
        loaded.append("lm_head.weight")
    return loaded
