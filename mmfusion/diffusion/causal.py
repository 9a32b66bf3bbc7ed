"""CausalFusion training sequences: dual factorisation over AR steps and diffusion steps.

For one image of N tokens: draw the number of AR steps S (P(S) ~ gamma^(S-1)), put the tokens in a
(random) order, cut that order into S groups of random sizes, draw a diffusion time t, noise every
token, and lay out [condition][clean groups][noisy groups]. The generalized causal mask (see
`mmfusion.model.masks`) lets noisy group s see the condition and clean groups < s only. The loss is
the diffusion regression on noisy tokens, weighted from `ar_weight` on group 1 down to 1 on group S.
"""

from __future__ import annotations

import functools
import math

import torch

from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.masks import CLEAN, NOISY
from mmfusion.model.sequence import SequenceBuilder


def ar_step_probs(
    n_tokens: int, gamma: float, max_steps: int | None = None, one_step_fraction: float = 0.0
) -> torch.Tensor:
    """P(S = s) for s = 1..max: proportional to gamma^(s-1), mixed with `one_step_fraction` of S = 1."""
    s_max = min(n_tokens, max_steps or n_tokens)
    probs = torch.zeros(s_max, dtype=torch.float64)
    probs[0] = 1.0
    if gamma > 0.0:
        probs = torch.softmax(torch.arange(s_max, dtype=torch.float64) * math.log(gamma), 0)
    probs = probs * (1.0 - one_step_fraction)
    probs[0] += one_step_fraction
    return probs


def sample_ar_steps(cfg: DiffusionConfig, n_tokens: int, generator: torch.Generator) -> int:
    """Draw the number of AR steps S of one training image (`ar_step_probs` under `cfg`)."""
    probs = _ar_step_probs_once(n_tokens, cfg.gamma, cfg.max_ar_steps, cfg.one_step_fraction)
    return int(torch.multinomial(probs, 1, generator=generator)) + 1


@functools.lru_cache(maxsize=64)
def _ar_step_probs_once(n_tokens: int, gamma: float, max_steps: int | None, one_step_fraction: float) -> torch.Tensor:
    """`ar_step_probs`, computed once per setting: it is drawn from for every training image (read only)."""
    return ar_step_probs(n_tokens, gamma, max_steps, one_step_fraction)


def random_group_sizes(n_tokens: int, steps: int, generator: torch.Generator) -> list[int]:
    """A uniformly random composition of n_tokens into `steps` positive parts."""
    cuts = (torch.randperm(n_tokens - 1, generator=generator)[: steps - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n_tokens]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def even_group_sizes(n_tokens: int, steps: int) -> list[int]:
    """Split n_tokens into `steps` groups whose sizes differ by at most one (inference default)."""
    if not 1 <= steps <= n_tokens:
        raise ValueError(f"AR steps must be in [1, {n_tokens}], got {steps}")
    base, extra = divmod(n_tokens, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def token_order(
    grid: tuple[int, int], order: str, generator: torch.Generator | None = None, block: int = 4
) -> torch.Tensor:
    """Indices of the h*w image tokens in generation order: random, raster or block-wise raster."""
    h, w = grid
    if order == "random":
        return torch.randperm(h * w, generator=generator)
    idx = torch.arange(h * w).view(h, w)
    if order == "raster":
        return idx.reshape(-1)
    if order == "block_raster":
        blocks = []
        for by in range(0, h, block):
            for bx in range(0, w, block):
                blocks.append(idx[by : by + block, bx : bx + block].reshape(-1))
        return torch.cat(blocks)
    raise ValueError(f"unknown token order {order!r}")


def ar_loss_weights(group_sizes: list[int], w: float) -> torch.Tensor:
    """Per-token weight: w on group 1 falling linearly to 1 on group S (w alone when S = 1)."""
    s = len(group_sizes)
    per_group = torch.full((s,), w) if s == 1 else torch.linspace(w, 1.0, s)
    return torch.repeat_interleave(per_group, torch.tensor(group_sizes))


def add_image(
    builder: SequenceBuilder,
    tokens: torch.Tensor,
    cfg: DiffusionConfig,
    scheduler,  # noqa: ANN001
    grid: tuple[int, int],
    generator: torch.Generator,
    clean_copy_of_last: bool = False,
    ar_steps: int | None = None,
    loss_scale: float = 1.0,
) -> SequenceBuilder:
    """Append one image (N, C) as CausalFusion training tokens: clean groups, then K noisy copies.

    `clean_copy_of_last` keeps the clean copy of group S too (caption order: the text that follows
    reads the whole clean image). `loss_scale` multiplies the loss weights of this image. Returns the
    builder, positioned after the image.
    """
    tokens = tokens.float()
    n = tokens.shape[0]
    steps = ar_steps or sample_ar_steps(cfg, n, generator)
    sizes = random_group_sizes(n, steps, generator)
    order = token_order(grid, training_order(cfg, steps, generator), generator, cfg.block_size)
    x0, pos = tokens[order], order
    group = torch.repeat_interleave(torch.arange(steps), torch.tensor(sizes))
    k = cfg.k_times
    # with K noisy copies, group ids are scaled so that copy j of group s sees only itself and clean < s
    n_clean = n if clean_copy_of_last else n - sizes[-1]
    if n_clean:
        builder.image(x0[:n_clean], pos[:n_clean], kind=CLEAN, group=group[:n_clean] * k + (k - 1))
    weights = ar_loss_weights(sizes, cfg.ar_weight) * loss_scale
    for copy in range(k):
        shape = (steps,) if cfg.per_group_t else (1,)
        t = sample_timesteps(cfg, shape, generator)
        t = t[group] if cfg.per_group_t else t.expand(n)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        builder.image(
            noisy,
            pos,
            kind=NOISY,
            group=group * k + copy,
            t=t,
            targets=diffusion_target(cfg, scheduler, x0, noise, t),
            weights=weights,
        )
    return builder.end_image()


def training_order(cfg: DiffusionConfig, steps: int, generator: torch.Generator) -> str:
    """The token order of one training image: `cfg.order`, or raster for a `raster_fraction` share of the
    images trained in several AR steps (one AR step has no order). Nothing is drawn when the share is 0,
    so the random stream of a run without it is unchanged."""
    if steps > 1 and cfg.raster_fraction > 0 and float(torch.rand(1, generator=generator)) < cfg.raster_fraction:
        return "raster"
    return cfg.order


def sample_timesteps(cfg: DiffusionConfig, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform over [0, T), or logit-normal (SD3), which trains the middle noise
    levels, where layout and shape are decided, more often than the ends."""
    if cfg.t_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator))
        return (u * (cfg.num_train_timesteps - 1)).round().long()
    return torch.randint(0, cfg.num_train_timesteps, shape, generator=generator)


def diffusion_target(
    cfg: DiffusionConfig,
    scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,  # noqa: ANN001
    t: torch.Tensor,
) -> torch.Tensor:
    if cfg.prediction_type == "epsilon":
        return noise
    if cfg.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0
