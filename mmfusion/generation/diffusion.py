"""Next-token(s) diffusion sampling (CausalFusion): any number of AR steps, any order.

For each AR step s the diffusion sampler (DDPM or DDIM) denoises group s, attending to the cached clean
prefix (condition plus finished groups); then the finished group is appended to the KV cache as clean
tokens. With `lookahead` L the next L tokens of the order are denoised beside the group, as noisy
tokens of the same group, and dropped at the end of the step: the group is drawn as a part of a larger
one (each AR step still samples p(group | prefix), as that joint's marginal). Classifier-free
guidance runs an unconditional stream beside the conditional one, only where it is switched on (an
interval of noise levels, and up to a given AR step).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from mmfusion.diffusion.causal import even_group_sizes, token_order
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import UserError
from mmfusion.generation.common import guide, guided_prefixes, inference
from mmfusion.generation.settings import DiffusionSampling
from mmfusion.model.cache import KVCache
from mmfusion.model.masks import CLEAN, NOISY
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import SequenceBuilder, TokenBatch, collate, image_block


@dataclass
class _Plan:
    """Per-sample generation plan: positions of the tokens of each AR group, and of the tokens denoised
    beside it and dropped (lookahead)."""

    groups: list[list[torch.Tensor]]  # [sample][group] -> image positions
    ahead: list[list[torch.Tensor]]  # [sample][group] -> the positions after the group, up to lookahead
    known: list[torch.Tensor]  # [sample] -> positions of given tokens (editing), may be empty


class NextTokenDiffusionSampler:
    def __init__(self, model: MMFusionModel, diffusion: DiffusionConfig, settings: DiffusionSampling) -> None:
        self.model = model
        self.diffusion = diffusion
        self.settings = settings
        self.grid = model.cfg.image_grid
        self.dim = model.cfg.image_token_dim

    # planning -----------------------------------------------------------------------------
    def _plan(self, batch: int, generators: list[torch.Generator], known_mask: torch.Tensor | None) -> _Plan:
        groups, ahead, known = [], [], []
        n = self.grid[0] * self.grid[1]
        for i in range(batch):
            order = token_order(self.grid, self.settings.order, generators[i], self.diffusion.block_size)
            if known_mask is not None:
                keep = known_mask[i][order]
                known.append(order[keep])
                order = order[~keep]
            else:
                known.append(order[:0])
            steps = min(self.settings.ar_steps, len(order))
            sizes = even_group_sizes(len(order), steps) if len(order) else []
            groups.append(list(order.split(sizes)) if sizes else [])
            ahead.append([order[end : end + self.settings.lookahead] for end in itertools.accumulate(sizes)])
        if known_mask is None and self.settings.ar_steps > n:
            raise UserError(f"ar_steps={self.settings.ar_steps} exceeds the {n} tokens of an image: choose 1 to {n}")
        return _Plan(groups, ahead, known)

    # main ---------------------------------------------------------------------------------
    @inference
    def __call__(
        self,
        conds: list[list[int]],
        unconds: list[list[int]] | None = None,
        generators: list[torch.Generator] | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample image tokens (B, N, C) for condition prefixes `conds` (token ids, ending in <boi>).

        `unconds` are the prefixes of the unconditional stream (needed when cfg_scale != 1);
        `known` (B, N, C) with `known_mask` (B, N) fixes given tokens (editing / inpainting).
        """
        s = self.settings
        b = len(conds)
        guided = s.cfg_scale != 1.0
        prefixes, generators = guided_prefixes(conds, unconds, generators, guided)
        img_pos = [len(p) for p in prefixes]
        plan = self._plan(b, generators, known_mask)
        out = known.clone().float() if known is not None else torch.zeros(b, self.grid[0] * self.grid[1], self.dim)
        scheduler = self.diffusion.make_scheduler(s.sampler)
        scheduler.set_timesteps(s.steps)
        # x0 predictions clipped to the data range here: DDPM clips them before its posterior anyway, but
        # DDIM derives its noise estimate from the x0 it is given and clips only afterwards, so a guided x0
        # far out of range would carry over into every later step through that noise estimate
        clip_x0 = self.diffusion.prediction_type == "sample" and self.diffusion.clip_sample
        n_groups = max(len(g) for g in plan.groups)
        dup = 2 if guided else 1
        state = _State(self, prefixes, plan, out, img_pos, use_cache)
        none_left = torch.zeros(0, dtype=torch.long)  # the positions to make of an image that is finished
        # one tick per denoising pass (S = 1 runs all of its passes in one AR step)
        bar = tqdm(total=n_groups * len(scheduler.timesteps), desc="denoising", disable=not progress, leave=False)
        for step in range(n_groups):
            bar.set_postfix_str(f"AR step {step + 1}/{n_groups}", refresh=False)
            pos_rows = [g[step] if step < len(g) else none_left for g in plan.groups]
            # the group and the tokens denoised beside it (lookahead); the first len(group) are kept
            work = [torch.cat([p, a[step]]) if step < len(a) else p for p, a in zip(pos_rows, plan.ahead)]
            ragged = len({len(p) for p in work}) > 1  # editing: images with different tokens to make
            x = self._noise(work, generators)
            for t in scheduler.timesteps:
                t = int(t)
                guided_now = s.guides(t, step, self.diffusion.num_train_timesteps)
                rows = dup if guided_now else 1
                pred = state.predict(step, work * rows, torch.cat([x] * rows), t, rows * b)
                if guided_now:
                    pred = guide(pred, b, s.cfg_scale)
                if clip_x0:
                    pred = pred.clamp(-1.0, 1.0)
                x = self._denoise(scheduler, pred, t, x, work if ragged else None, generators)
                bar.update()
            for i, p in enumerate(pos_rows):
                out[i, p] = x[i, : len(p)]
            if step + 1 < n_groups:  # the last group is read by nobody: no pass to cache it
                state.finish_group(step, pos_rows * dup, torch.cat([x] * dup))
        bar.close()
        return out

    def _noise(self, pos_rows: list[torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        """The starting noise of an AR step (B, width, C), each image's from its own generator; an image
        with fewer tokens to make (editing) is zero-padded."""
        x = torch.zeros(len(pos_rows), max(len(p) for p in pos_rows), self.dim)
        for i, (p, gen) in enumerate(zip(pos_rows, generators)):
            x[i, : len(p)] = torch.randn(len(p), self.dim, generator=gen)
        return x

    def _denoise(
        self,
        scheduler: Any,
        pred: torch.Tensor,
        t: int,
        x: torch.Tensor,
        ragged: list[torch.Tensor] | None,
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """One scheduler step of the whole batch, or, with `ragged` token positions per image, row by
        row, so that each image draws the step's noise for its own tokens only."""
        if ragged is None:
            return self._step(scheduler, pred, t, x, generators)
        for i, (p, gen) in enumerate(zip(ragged, generators)):
            if len(p):
                one = slice(i, i + 1), slice(0, len(p))
                x[one] = self._step(scheduler, pred[one], t, x[one], [gen])
        return x

    def _step(
        self, scheduler: Any, pred: torch.Tensor, t: int, x: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """The scheduler's step, its added noise scaled by the temperature: x_prev = mean + tau * (the
        scheduler's x_prev - mean), where mean is the step without noise (DDPM's posterior mean)."""
        s = self.settings
        kwargs = {"eta": s.eta} if s.sampler == "ddim" else {}
        out = scheduler.step(pred, t, x, generator=generators, **kwargs)
        if s.temperature == 1.0:
            return out.prev_sample
        if s.sampler == "ddim":
            mean = scheduler.step(pred, t, x, variance_noise=torch.zeros_like(x), **kwargs).prev_sample
        else:
            mean = _ddpm_posterior_mean(scheduler, out.pred_original_sample, x, t)
        return mean + s.temperature * (out.prev_sample - mean)


def _ddpm_posterior_mean(scheduler: Any, x0: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """The mean of DDPM's posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 7), with the scheduler's
    noise levels: what its step returns before it adds noise."""
    prev = int(scheduler.previous_timestep(t))
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
    alpha = a_t / a_prev
    return (a_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - a_prev) * x) / (1 - a_t)


@dataclass
class _Pass:
    """The parts of a denoising pass that stay fixed over one AR step: the layout of the noisy
    tokens, the cache rows they read, the mask joined with the cache, the rotary tables."""

    template: TokenBatch
    cache: KVCache
    mask: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]


class _State:
    """The clean prefix: a KV cache, or (reference path) the clean tokens to re-run every step."""

    def __init__(
        self,
        sampler: NextTokenDiffusionSampler,
        prefixes: list[list[int]],
        plan: _Plan,
        out: torch.Tensor,
        img_pos: list[int],
        use_cache: bool,
    ) -> None:
        self.s, self.model, self.img_pos, self.use_cache = sampler, sampler.model, img_pos, use_cache
        rows = len(prefixes)
        b = len(plan.known)
        self.prefixes = prefixes
        known_rows = [(plan.known[i % b], out[i % b, plan.known[i % b]]) for i in range(rows)]
        self.clean: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[r] for r in known_rows]
        self.cache: KVCache | None = None
        self._template_key: tuple[int, int] | None = None
        if use_cache:
            self.cache = self.model.new_cache()
            prefix = collate([SequenceBuilder(sampler.dim).text(p, prompt=True).tensors() for p in prefixes])
            self.model(prefix, self.cache, store=True)
            if any(len(k[0]) for k in known_rows):
                self.model(image_block(known_rows, CLEAN, img_pos, sampler.dim), self.cache, store=True)

    def predict(self, step: int, pos_rows: list[torch.Tensor], x: torch.Tensor, t: int, rows: int) -> torch.Tensor:
        if not self.use_cache:
            return self._uncached([(p, x[i, : len(p)]) for i, p in enumerate(pos_rows)], t, rows)
        if self._template_key != (step, rows):  # what all denoising steps of this AR step share, built once
            zeros = [(p, x.new_zeros(len(p), x.shape[-1])) for p in pos_rows]
            tpl = image_block(zeros, NOISY, self.img_pos[:rows], self.s.dim).to(self.model.device)
            cache = self.cache if rows == len(self.prefixes) else self.cache.rows(rows)
            self._pass = _Pass(
                tpl,
                cache,
                self.model.backbone.full_mask(tpl.mask(), cache),
                self.model.backbone.rotary(self.model.rotary_positions(tpl), self.model.dtype),
            )
            self._template_key = (step, rows)
        p = self._pass
        # x is empty when editing gives every token
        values = x.to(p.template.values.device) if x.shape[1] == p.template.kind.shape[1] else p.template.values
        # only the values and the timestep change between denoising steps: embed just those (padding
        # slots get image embeddings too; they see only themselves and nobody reads them)
        t = torch.tensor([t], device=values.device)
        emb = self.model.image_embedding(values, p.template.image_pos, t)  # in the model's dtype
        p.cache.reserve(emb, emb.shape[1])
        hidden = self.model.backbone(emb, p.template.position_ids, p.mask, p.cache, rope=p.rope)
        # the sampler's own state stays on the CPU (seeded there, whatever the model's device)
        return self.model.image_output(hidden)[:, : x.shape[1]].float().to(x.device)

    def _uncached(self, noisy: list[tuple[torch.Tensor, torch.Tensor]], t: int, rows: int) -> torch.Tensor:
        samples, starts = [], []
        for i in range(rows):
            b = SequenceBuilder(self.s.dim).text(self.prefixes[i], prompt=True)
            for g, (pos, vals) in enumerate(self.clean[i]):
                if len(pos):
                    b.image(vals, pos, kind=CLEAN, group=torch.full((len(pos),), g))
            starts.append(b.length)
            pos, vals = noisy[i]
            if len(pos):
                n = len(pos)
                b.image(vals, pos, kind=NOISY, group=torch.full((n,), len(self.clean[i])), t=torch.full((n,), t))
            samples.append(b.tensors())
        batch = collate(samples)
        pred = self.model.image_output(self.model(batch)).float().cpu()
        width = max(len(p) for p, _ in noisy)
        res = torch.zeros(rows, width, pred.shape[-1])
        for i, (pos, _) in enumerate(noisy):
            res[i, : len(pos)] = pred[i, starts[i] : starts[i] + len(pos)]
        return res

    def finish_group(self, step: int, pos_rows: list[torch.Tensor], x: torch.Tensor) -> None:
        rows = [(p, x[i, : len(p)]) for i, p in enumerate(pos_rows)]
        if self.use_cache:
            self.model(image_block(rows, CLEAN, self.img_pos, self.s.dim), self.cache, store=True)
        else:
            for i, r in enumerate(rows):
                self.clean[i].append(r)
