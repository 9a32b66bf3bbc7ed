"""Settings of the diffusion process and of CausalFusion's dual factorisation: a plain dataclass, so
that reading a config loads no model code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmfusion.errors import ConfigError, check

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
        check(
            [
                (self.order in ORDERS, "order", f"must be one of {', '.join(ORDERS)}, got {self.order!r}"),
                (
                    self.prediction_type in PREDICTIONS,
                    "prediction_type",
                    f"must be one of {', '.join(PREDICTIONS)}, got {self.prediction_type!r}",
                ),
                (0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}"),
                (
                    0.0 <= self.raster_fraction <= 1.0,
                    "raster_fraction",
                    f"must be in [0, 1], got {self.raster_fraction}",
                ),
                (
                    0.0 <= self.one_step_fraction <= 1.0,
                    "one_step_fraction",
                    f"must be in [0, 1], got {self.one_step_fraction}",
                ),
                (
                    self.t_sampling in ("uniform", "logit_normal"),
                    "t_sampling",
                    f"must be uniform or logit_normal, got {self.t_sampling!r}",
                ),
                (self.k_times >= 1, "k_times", f"must be at least 1, got {self.k_times}"),
            ]
        )

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
        raise ConfigError("sampler", f"must be ddpm or ddim, got {kind!r}")
