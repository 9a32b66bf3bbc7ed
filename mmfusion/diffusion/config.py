"""Settings of the diffusion process, of CausalFusion's dual factorisation, and of sampling: plain
dataclasses, so that reading a config loads no model code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmfusion.errors import require

ORDERS = ("random", "raster", "block_raster")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = 1000  # diffusion timesteps T of the noise schedule
    beta_schedule: str = "linear"  # diffusers names: linear (DDPM), scaled_linear, squaredcos_cap_v2
    prediction_type: str = "epsilon"  # epsilon (paper), v_prediction or sample
    clip_sample: bool = False  # clip predicted x0 to [-1, 1] while sampling (pixel tokens)
    gamma: float = 0.9  # P(S) ~ gamma^(S-1); 0 -> always S = 1 (in-context DiT); 1 -> uniform
    # share of images trained in one AR step before S is drawn as above: keeps most of the training on
    # the one-step layout while every S still gets its share (0: the paper's distribution)
    one_step_fraction: float = 0.0
    max_ar_steps: int | None = None  # cap on S during training (default: N tokens)
    ar_weight: float = 2.0  # loss weight on AR group 1, falling linearly to 1 on group S
    order: str = "random"  # token order during training: random | raster | block_raster
    # share of the images trained in several AR steps whose tokens go in raster order instead (sampling
    # one token per step in raster order then follows a layout the model has seen)
    raster_fraction: float = 0.0
    block_size: int = 4  # block side for block_raster
    per_group_t: bool = False  # draw one t per AR group instead of one per image
    k_times: int = 1  # diffusion times per AR step, sharing one clean prefix
    t_sampling: str = "uniform"  # training timesteps: uniform | logit_normal

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {self.prediction_type!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.raster_fraction <= 1.0:
            raise ValueError(f"raster_fraction must be in [0, 1], got {self.raster_fraction}")
        if not 0.0 <= self.one_step_fraction <= 1.0:
            raise ValueError(f"one_step_fraction must be in [0, 1], got {self.one_step_fraction}")
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be uniform or logit_normal, got {self.t_sampling!r}")
        if self.k_times < 1:
            raise ValueError(f"k_times must be >= 1, got {self.k_times}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def make_scheduler(self, kind: str = "ddpm"):  # noqa: ANN201
        """A diffusers scheduler (DDPM for training and ancestral sampling, DDIM for few steps)."""
        from diffusers import DDIMScheduler, DDPMScheduler

        common = dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,
        )
        if kind == "ddpm":
            return DDPMScheduler(**common, variance_type="fixed_small")
        if kind == "ddim":
            return DDIMScheduler(**common, set_alpha_to_one=True)
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {kind!r}")


@dataclass(frozen=True)
class SamplerSettings:
    ar_steps: int = 1  # S: 1 is pure diffusion, N pure AR
    order: str = "random"  # random | raster | block_raster
    sampler: str = "ddpm"  # ddpm | ddim
    steps: int = 50  # denoising steps per AR step
    cfg_scale: float = 1.0  # 1 disables guidance
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only where t / T lies in [lo, hi]
    cfg_until_step: int | None = None  # no guidance after this AR step (1-based)
    eta: float = 0.0  # DDIM stochasticity
    # discrete (Token-Shuffle) path: autoregressive sampling of codes
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    cfg_schedule: str = "constant"  # constant | linear | cosine ramp of the guidance over the token index

    def __post_init__(self) -> None:
        """Bad values are refused here, as one error line, before any sampling (CLI options and the
        `sample` config section both end up here)."""
        checks = [
            (self.ar_steps >= 1, f"ar_steps must be at least 1, got {self.ar_steps}"),
            (self.order in ORDERS, f"order must be one of {', '.join(ORDERS)}, got {self.order!r}"),
            (self.sampler in ("ddpm", "ddim"), f"sampler must be ddpm or ddim, got {self.sampler!r}"),
            (self.steps >= 1, f"steps (denoising steps per AR step) must be at least 1, got {self.steps}"),
            (self.cfg_scale >= 0, f"the guidance scale must not be negative, got {self.cfg_scale}"),
            (
                len(self.cfg_interval) == 2 and 0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1,
                f"cfg_interval must be LO <= HI within [0, 1], got {self.cfg_interval}",
            ),
            (
                self.cfg_until_step is None or self.cfg_until_step >= 0,
                f"cfg_until_step must not be negative, got {self.cfg_until_step}",
            ),
            (self.eta >= 0, f"eta must not be negative, got {self.eta}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must not be negative (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
        ]
        require(checks)

    def guides(self, t: int, ar_step: int, num_train_timesteps: int) -> bool:
        if self.cfg_scale == 1.0:
            return False
        if self.cfg_until_step is not None and ar_step + 1 > self.cfg_until_step:
            return False
        lo, hi = self.cfg_interval
        return lo <= t / num_train_timesteps <= hi
