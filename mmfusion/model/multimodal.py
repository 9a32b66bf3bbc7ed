"""MMFusionModel: the backbone plus the embeddings and heads for text, class and image tokens."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from mmfusion.model.cache import KVCache
from mmfusion.model.config import ModelConfig
from mmfusion.model.fp32_linear import linear_fp32
from mmfusion.model.sequence import BatchRows, TokenBatch, place_rows, select_rows
from mmfusion.model.token_shuffle import TokenShuffle, TokenUnshuffle
from mmfusion.model.transformer import Transformer


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin/cos position embeddings (h * w, dim): half the channels encode the row,
    half the column."""
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1])).float()


class TimestepEmbedder(nn.Module):
    """Diffusion timestep -> sinusoidal features -> MLP (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class MMFusionModel(nn.Module):
    """One decoder over interleaved text and continuous image tokens.

    Text ids below `vocab_size` use `embed_tokens`; ids from `vocab_size` on are class tokens
    (class-conditional mode). Image tokens enter through `image_in`, plus their 2-D position
    embedding and, added to every image token, the embedding of its diffusion timestep (0 = clean).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emit_vocab: int | None = None  # see text_logits
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.class_embed = nn.Embedding((cfg.num_classes + 1) * cfg.class_tokens, cfg.dim) if cfg.num_classes else None
        self.image_in = nn.Linear(cfg.image_token_dim, cfg.dim)
        if cfg.image_pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(cfg.num_image_tokens, cfg.dim))
        else:
            self.register_buffer("pos_embed", sincos_2d(cfg.image_grid, cfg.dim), persistent=False)
        self.time_embed = TimestepEmbedder(cfg.dim)
        self.backbone = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        head_in = cfg.image_head_hidden or cfg.dim
        self.image_head_mlp = (
            nn.Sequential(nn.Linear(cfg.dim, head_in), nn.SiLU()) if cfg.image_head_hidden else nn.Identity()
        )
        self.image_head = nn.Linear(head_in, cfg.image_token_dim)
        if cfg.discrete:  # Token-Shuffle path for discrete image codes
            self.shuffle_in = TokenShuffle(cfg)
            self.shuffle_out = TokenUnshuffle(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=self.cfg.init_std)
        # DiT: the image output starts at zero, so the first prediction is "no noise"
        nn.init.zeros_(self.image_head.weight)
        nn.init.zeros_(self.image_head.bias)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, batch: TokenBatch, rows: BatchRows | None = None) -> torch.Tensor:
        """Input embeddings (B, L, dim) for every kind of token. `rows`: where the image and code tokens
        sit, when the caller found them already (a compiled training step, which then has no
        data-dependent shape inside it)."""
        ids = batch.ids
        vocab = self.cfg.vocab_size
        x = self.embed_tokens(ids.clamp(0, vocab - 1)).to(self.dtype)  # tied to an fp32 head: may be float32
        if self.class_embed is not None:
            is_class = ids >= vocab
            x = torch.where(is_class[..., None], self.class_embed((ids - vocab).clamp(min=0)), x)
        # image and code tokens by row numbers (index_select / index_copy) rather than boolean masks:
        # the same values, about a quarter of a millisecond less per training step
        rows = rows or BatchRows.of(batch, codes=self.cfg.discrete)
        if rows.image.numel():
            values, pos = select_rows(batch.values, rows.image), select_rows(batch.image_pos, rows.image)
            time = self.time_embed(rows.steps).index_select(0, rows.which)
            x = place_rows(x, rows.image, self.image_embedding(values, pos, time=time))
        if rows.code.numel():
            codes, pos = select_rows(batch.codes, rows.code), select_rows(batch.image_pos, rows.code)
            x = place_rows(x, rows.code, self.shuffle_in(codes) + self.grid_embedding(pos))
        return x

    def image_embedding(
        self,
        values: torch.Tensor,
        image_pos: torch.Tensor,
        t: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings of continuous image tokens: values (..., C), grid positions (...) and
        timesteps (...) -> (..., dim). `t` may also be one timestep for all tokens (shape (1,)); `time`
        is the timestep embedding itself, where the caller made it. The timestep MLP runs once per
        distinct timestep, not once per token (a training batch has a few timesteps per image over its
        16-256 tokens)."""
        if time is None:
            steps, which = torch.unique(t.reshape(-1), return_inverse=True)
            time = self.time_embed(steps).index_select(0, which.reshape(-1)).view(*t.shape, -1)
        return self.image_in(values.to(self.image_in.weight.dtype)) + self.grid_embedding(image_pos) + time

    def grid_embedding(self, image_pos: torch.Tensor) -> torch.Tensor:
        """Position embeddings of image tokens at grid positions `image_pos` (...) -> (..., dim). Read
        with `index_select`, whose backward (index_add) is much cheaper than that of `pos_embed[image_pos]`
        (an accumulating index_put over the few grid positions that all tokens share)."""
        return self.pos_embed.index_select(0, image_pos.reshape(-1)).view(*image_pos.shape, -1)

    def forward(
        self,
        batch: TokenBatch,
        cache: KVCache | None = None,
        store: bool = False,
        mask: torch.Tensor | None = None,
        rows: BatchRows | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, dim). `mask` defaults to the generalized causal mask of `batch`; `rows`: see
        `embed`. A batch (and mask) built on the CPU, as the samplers build theirs, is moved to the model's
        device here."""
        if batch.ids.device != self.device:
            batch, rows = batch.to(self.device), rows and rows.to(self.device)
        mask = batch.mask(bidirectional_prompt=self.cfg.bidirectional_prompt) if mask is None else mask.to(self.device)
        x = self.embed(batch, rows)
        positions = self.rotary_positions(batch)
        # The rotary tables are made here, not inside the backbone: a compiled backbone then takes them
        # as inputs, where inductor had recomputed their cosines from the positions in each layer's
        # kernels, forward and backward.
        rope = self.backbone.rotary(positions, x.dtype)
        if cache is None:
            return self.backbone(x, positions, mask, rope=rope)
        # room made and keys kept out here, not in the backbone: a compiled backbone then has no guard on
        # the cache's size or on whether it holds anything yet (docs/how-it-works.md)
        cache.reserve(x, x.shape[1])
        hidden = self.backbone(x, positions, mask, cache, rope=rope)
        if store:
            cache.commit(batch.valid())
        return hidden

    def rotary_positions(self, batch: TokenBatch) -> torch.Tensor:
        """(B, L) sequence positions, or (B, L, 3) with image rows / columns under `image_rope`."""
        if not self.cfg.image_rope:
            return batch.position_ids
        w = self.cfg.image_grid[1]
        is_image = batch.is_image().long()
        p = batch.position_ids
        return torch.stack([p, p + is_image * (batch.image_pos // w), p + is_image * (batch.image_pos % w)], -1)

    def _head(self, head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        if not self.cfg.fp32_head:
            return head(hidden)
        if not torch.is_autocast_enabled(hidden.device.type):
            return head(hidden.float())
        if type(head) is nn.Linear and torch.compiler.is_compiling():  # in a graph, an operator: `linear_fp32`
            return linear_fp32(hidden, head.weight, head.bias)
        with torch.autocast(hidden.device.type, enabled=False):  # an adapted head (LoRA on it)
            return head(hidden.float())

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the text vocabulary; over its first `emit_vocab` ids where that is set (a base whose
        adapter with new words is disabled: the base's own ids)."""
        logits = self._head(self.lm_head, hidden)
        return logits if self.emit_vocab is None else logits[..., : self.emit_vocab]

    def code_logits(self, hidden: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(n, dim) -> logits (n, s^2, K) over the codebook, or (n, s^2, d) bit logits (bitwise heads).
        `codes` (n, s^2): the window's codes, read by the autoregressive window head only."""
        return self._head(self.shuffle_out.head, self.shuffle_out.slots(hidden, codes))

    def image_output(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(self.image_head, self.image_head_mlp(hidden))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the backbone computes in (its weights' dtype; autocast may still lower it)."""
        return self.backbone.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.norm.weight.device

    def output_heads(self) -> list[nn.Linear]:
        """The linear maps to logits / image values, which `fp32_head` keeps in float32."""
        return [self.lm_head, self.image_head] + ([self.shuffle_out.head] if self.cfg.discrete else [])

    def to_dtype(self, dtype: torch.dtype) -> MMFusionModel:
        """Weights in `dtype` for inference (bfloat16: half the backbone's memory, and up to about twice as
        fast for large passes on CPUs that multiply bf16 natively; docs/BENCHMARKS.md). Kept in float32: the rotary
        frequencies (their angles reach hundreds of radians, which bf16 cannot place) and, with
        `fp32_head`, the output heads, as in training. Embedding inputs (image values, timestep features,
        code bits) are cast on entry; the KV cache takes the dtype of the keys."""
        inv_freq = self.backbone.rotary.inv_freq
        self.to(dtype)
        self.backbone.rotary.inv_freq = inv_freq
        if self.cfg.fp32_head:
            for head in self.output_heads():
                head.float()
        return self

    def resize_vocab(self, pieces: list[list[int]] | int) -> MMFusionModel:
        """Grow the text vocabulary by one token per entry of `pieces` (the ids the new token was spelt
        with): its embedding and its text head row start as the mean of theirs, so a new whole word starts
        where its spelling was (Hewitt 2021, on initialising new words). An int shrinks the vocabulary back
        to that many tokens. Class-conditional models keep theirs (their class ids follow the text ids)."""
        if self.cfg.num_classes:
            raise ValueError("a class-conditional model's text vocabulary cannot change size")
        emb, head = self.embed_tokens.weight, self.lm_head.weight
        if isinstance(pieces, int):
            new_emb, new_head = emb.detach()[:pieces], head.detach()[:pieces]
        else:
            means = [[w.detach()[p].mean(0, keepdim=True) for p in pieces] for w in (emb, head)]
            new_emb, new_head = torch.cat([emb.detach(), *means[0]]), torch.cat([head.detach(), *means[1]])
        self.embed_tokens.weight = nn.Parameter(new_emb.clone(), requires_grad=emb.requires_grad)
        self.embed_tokens.num_embeddings = new_emb.shape[0]
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight = nn.Parameter(new_head.clone(), requires_grad=head.requires_grad)
        self.lm_head.out_features = new_emb.shape[0]
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_emb.shape[0])
        return self

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers, self.cfg.kv_heads, self.cfg.head_dim)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
