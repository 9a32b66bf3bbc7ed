"""The LLaMA-style decoder backbone: pre-norm blocks, QK-norm attention over an arbitrary mask."""

from __future__ import annotations

import inspect
import shutil

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmfusion.model.attention_backends import masked_attention
from mmfusion.model.cache import KVCache
from mmfusion.model.config import ModelConfig
from mmfusion.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with per-head QK RMSNorm and rotary positions; q / k / v
    biases with `qkv_bias` (Qwen2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.backend = cfg.attention
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # (B, H, N, D)
        if cache is not None:
            k, v = cache.attend(layer, k, v)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        k, v = k.to(q.dtype), v.to(q.dtype)
        out = masked_attention(q, k, v, mask, self.backend)  # (B, H, N, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block, with Switti's optional sandwich norms."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.attn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()
        self.mlp_out_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.sandwich_norm else nn.Identity()

    def forward(self, x, rope, mask, cache=None, layer=0):  # noqa: ANN001, ANN201
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        x = x + self.attn_out_norm(h)
        return x + self.mlp_out_norm(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """Stack of blocks over input embeddings; returns final-normed hidden states.

    `attn_mask` (B, N, N) says which of the N new tokens each new token may attend to (True =
    attend). With a cache, every valid cached position is visible to every new token as well.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        scaling = dict(
            rope_type=cfg.rope_type,
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_context=cfg.rope_original_context,
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, scaling)
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim), position_ids (B, N), attn_mask (B, N, N) bool -> (B, N, dim).

        With a `cache`, the new tokens attend to the cached ones too, and their keys are written after
        them; the caller keeps them (`cache.commit`) or lets the next pass overwrite them, and makes room
        first (`cache.reserve`), so that this pass, which may be compiled, has no branch on the cache's
        state (`MMFusionModel.forward`). Callers that run many passes over one layout (the denoising
        steps of an AR group) may pass the mask already joined with the T cached positions,
        (B, N, T + N), from `full_mask`, and the rotary tables from `self.rotary`.
        """
        mask = attn_mask
        if cache is not None and mask.shape[-1] != len(cache) + x.shape[1]:
            mask = self.full_mask(mask, cache)
        if rope is None:
            rope = self.rotary(position_ids, x.dtype)
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        return self.norm(x)

    @staticmethod
    def full_mask(attn_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The mask of N new tokens (B, N, N) joined with the cached positions: (B, N, T + N); every
        new token sees every valid cached one."""
        if not len(cache):
            return attn_mask
        past = cache.valid[:, None, :].expand(-1, attn_mask.shape[1], -1)
        return torch.cat([past, attn_mask], dim=-1)


def can_compile(device: torch.device | str | None = None) -> bool:
    """Whether torch.compile's inductor can build kernels for `device` (default: a GPU if there is one):
    on a GPU, or on CPU with a C++ compiler."""
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return on_gpu or any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# the graphs a sampling process compiles: a pass that stores or not, one row or several, one new token
# or several, for images and captions; dynamo's default limit of 8 per function would send later calls
# of new sizes back to eager
INFERENCE_RECOMPILE_LIMIT = 64


def compile_for_inference(model: nn.Module) -> bool:
    """torch.compile the transformer of `model` in place for sampling and captioning (shapes dynamic:
    batch, sequence and cache length), with room for the graphs that inference needs. False, with a
    message, where inductor cannot build kernels for the model's device."""
    if not can_compile(next(model.parameters()).device):
        print("compile: no C++ compiler found (install g++), sampling uncompiled")
        return False
    limit = {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # this model's own limit
        limit["recompile_limit"] = INFERENCE_RECOMPILE_LIMIT
    else:  # older torch: the process's
        from torch._dynamo import config  # loaded only by those who compile

        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), INFERENCE_RECOMPILE_LIMIT))
    compile_stack(model, **limit)
    return True


def compile_stack(model: nn.Module, per_block: bool = False, **options: int) -> None:
    """torch.compile, in place and with dynamic shapes, every transformer of `model` as one graph, or with
    `per_block` every block on its own; `options` go to torch.compile (e.g. a `recompile_limit`)."""
    kind = Block if per_block else Transformer
    for module in model.modules():
        if isinstance(module, kind):
            module.compile(dynamic=True, **options)
