"""Weight and config conversion from Hugging Face LLaMA-family checkpoints (LLaMA, Qwen3).

Our parameter names are LLaMA's, so the conversion is a prefix rename: `model.layers.*` ->
`backbone.layers.*`, `model.norm` -> `backbone.norm`, `model.embed_tokens` -> `embed_tokens`.
"""

from __future__ import annotations

from typing import Any

import torch

from mmfusion.model.config import ModelConfig


def config_from_hf(hf: Any, **overrides: Any) -> ModelConfig:
    """A ModelConfig whose backbone matches a transformers LlamaConfig / Qwen3Config."""
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported yet; only default rotary embeddings")
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
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LlamaForCausalLM / Qwen3ForCausalLM state dict to MMFusionModel names."""
    out = {}
    for name, tensor in hf_state.items():
        if name.startswith("model.embed_tokens."):
            name = name.removeprefix("model.")
        elif name.startswith("model."):
            name = "backbone." + name.removeprefix("model.")
        elif not name.startswith("lm_head."):
            continue
        out[name] = tensor
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # tied checkpoints store one copy
    return out
