"""How each sampler samples: one typed settings object per sampler, and the config section that holds
all three. Plain dataclasses, so that reading a config loads no model code.

- `DiffusionSampling`: CausalFusion's next-token(s) diffusion (continuous image tokens);
- `TokenSampling`: Token-Shuffle's autoregressive codes (discrete image tokens);
- `CaptionSampling`: text decoding for captions.

A model folder saves its defaults as the `sample:` section (`SampleConfig`); the pipeline takes one of
these objects whole, or changes to the model's defaults by name (`pipe.generate(p, ar_steps=4)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mmfusion.diffusion.config import ORDERS
from mmfusion.errors import ConfigError, check

CFG_SCHEDULES = ("constant", "linear", "cosine")
CAPTION_METHODS = ("greedy", "beam", "nucleus")


def _unit_interval(value: float) -> bool:
    return 0 < value <= 1


@dataclass(frozen=True)
class DiffusionSampling:
    """CausalFusion's sampler: the image in `ar_steps` groups, each denoised in `steps` steps."""

    ar_steps: int = 1  # S: 1 is pure diffusion, N tokens pure AR
    order: str = "random"  # token order of the AR steps: random | raster | block_raster
    sampler: str = "ddpm"  # ddpm | ddim
    steps: int = 50  # denoising steps per AR step
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1 disables it
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only where t / T lies in [lo, hi]
    cfg_until_step: int | None = None  # no guidance after this AR step (1-based)
    eta: float = 0.0  # DDIM stochasticity
    # the noise each denoising step adds, scaled by this (MAR's sampling temperature): below 1 draws
    # nearer the modes of the model; DDPM, and DDIM with eta > 0 (DDIM with eta 0 adds none)
    temperature: float = 1.0
    # tokens of the order beyond each AR group denoised with it and then dropped: the group is drawn as
    # part of a larger one (the marginal of p(group + next tokens | prefix)), which a model trained
    # mostly at one AR step draws more consistently than the group alone. 0 is the paper's sampler
    lookahead: int = 0

    def __post_init__(self) -> None:
        lo_hi = self.cfg_interval
        check(
            [
                (self.ar_steps >= 1, "ar_steps", f"must be at least 1, got {self.ar_steps}"),
                (self.order in ORDERS, "order", f"must be one of {', '.join(ORDERS)}, got {self.order!r}"),
                (self.sampler in ("ddpm", "ddim"), "sampler", f"must be ddpm or ddim, got {self.sampler!r}"),
                (self.steps >= 1, "steps", f"(denoising steps per AR step) must be at least 1, got {self.steps}"),
                (self.cfg_scale >= 0, "cfg_scale", f"must not be negative, got {self.cfg_scale}"),
                (
                    len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] <= 1,
                    "cfg_interval",
                    f"must be LO <= HI within [0, 1], got {lo_hi}",
                ),
                (
                    self.cfg_until_step is None or self.cfg_until_step >= 0,
                    "cfg_until_step",
                    f"must not be negative, got {self.cfg_until_step}",
                ),
                (self.eta >= 0, "eta", f"must not be negative, got {self.eta}"),
                (self.temperature >= 0, "temperature", f"must not be negative, got {self.temperature}"),
                (self.lookahead >= 0, "lookahead", f"must not be negative, got {self.lookahead}"),
            ]
        )

    def guides(self, t: int, ar_step: int, num_train_timesteps: int) -> bool:
        """Whether guidance is on at timestep `t` of AR step `ar_step` (0-based)."""
        if self.cfg_scale == 1.0:
            return False
        if self.cfg_until_step is not None and ar_step + 1 > self.cfg_until_step:
            return False
        lo, hi = self.cfg_interval
        return lo <= t / num_train_timesteps <= hi


@dataclass(frozen=True)
class TokenSampling:
    """Token-Shuffle's sampler: codes drawn one transformer token (s x s codes) at a time."""

    temperature: float = 1.0  # softmax temperature of the codes
    top_k: int = 0  # keep the k most likely codes (0: all)
    top_p: float = 1.0  # nucleus of this probability mass (1: all)
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1 disables it
    cfg_schedule: str = "constant"  # constant, or a linear / cosine ramp from 1 to cfg_scale over the tokens

    def __post_init__(self) -> None:
        check(
            [
                (self.temperature > 0, "temperature", f"must be positive, got {self.temperature}"),
                (self.top_k >= 0, "top_k", f"must not be negative (0 turns it off), got {self.top_k}"),
                (_unit_interval(self.top_p), "top_p", f"must be in (0, 1], got {self.top_p}"),
                (self.cfg_scale >= 0, "cfg_scale", f"must not be negative, got {self.cfg_scale}"),
                (
                    self.cfg_schedule in CFG_SCHEDULES,
                    "cfg_schedule",
                    f"must be one of {', '.join(CFG_SCHEDULES)}, got {self.cfg_schedule!r}",
                ),
            ]
        )


@dataclass(frozen=True)
class CaptionSampling:
    """Caption decoding: greedy, beam search or nucleus sampling."""

    method: str = "greedy"  # greedy | beam | nucleus
    max_new_tokens: int = 32  # caption length limit in tokens
    min_new_tokens: int = 0  # <eos> is not allowed before this many tokens (benchmarks use it)
    num_beams: int = 4  # beams of beam search
    length_penalty: float = 1.0  # beam search: scores divided by length ** this
    top_p: float = 0.9  # nucleus sampling: probability mass kept
    temperature: float = 1.0  # nucleus sampling: softmax temperature
    # beam search: each candidate scored by its log-probability - rerank_weight x the error of the
    # model's T2I prediction of the image under it (mmfusion.generation.rerank); 0 keeps beam search's own
    rerank_weight: float = 0.0
    rerank_timesteps: int = 8  # noise levels of that error (CausalFusion images)

    def __post_init__(self) -> None:
        check(
            [
                (
                    self.method in CAPTION_METHODS,
                    "method",
                    f"must be one of {', '.join(CAPTION_METHODS)}, got {self.method!r}",
                ),
                (self.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}"),
                (
                    0 <= self.min_new_tokens <= self.max_new_tokens,
                    "min_new_tokens",
                    f"must be within 0..max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}",
                ),
                (self.num_beams >= 1, "num_beams", f"must be at least 1, got {self.num_beams}"),
                (_unit_interval(self.top_p), "top_p", f"must be in (0, 1], got {self.top_p}"),
                (self.temperature > 0, "temperature", f"must be positive, got {self.temperature}"),
                (self.rerank_weight >= 0, "rerank_weight", f"must not be negative, got {self.rerank_weight}"),
                (self.rerank_timesteps >= 1, "rerank_timesteps", f"must be at least 1, got {self.rerank_timesteps}"),
            ]
        )


Settings = DiffusionSampling | TokenSampling | CaptionSampling


def with_changes(settings: Settings, what: str, **changes: Any) -> Settings:
    """`settings` with `changes` made (None leaves a setting as it is). A name the type does not have is a
    ConfigError that lists the ones it has: `what` names the sampler in that message."""
    names = [f.name for f in dataclasses.fields(settings)]
    given = {k: v for k, v in changes.items() if v is not None}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(
            unknown[0], f"not a setting of {what} ({type(settings).__name__}); its settings: {', '.join(names)}"
        )
    if "cfg_interval" in given:
        given["cfg_interval"] = tuple(given["cfg_interval"])
    return dataclasses.replace(settings, **given)


@dataclass(frozen=True)
class SampleConfig:
    """The `sample:` section: a model's default settings for each of its samplers."""

    diffusion: DiffusionSampling = field(default_factory=DiffusionSampling)  # CausalFusion's images
    tokens: TokenSampling = field(default_factory=TokenSampling)  # Token-Shuffle's images
    caption: CaptionSampling = field(default_factory=CaptionSampling)  # captions, either kind of model

    def changed(self, changes: dict[str, dict[str, Any]] | None) -> SampleConfig:
        """These settings with `changes` made, by sampler and name ({"diffusion": {"cfg_scale": 2.0}}, as a
        fine-tuning records the settings its model samples with); None changes nothing."""
        known = [f.name for f in dataclasses.fields(self)]
        check((part in known, part, f"not a sampler; the samplers: {', '.join(known)}") for part in changes or {})
        parts = {
            part: with_changes(getattr(self, part), f"the {part} sampler", **given)
            for part, given in (changes or {}).items()
        }
        return dataclasses.replace(self, **parts)

    @staticmethod
    def nest(data: Any) -> Any:
        """The section from one written before it had a part per sampler (one flat mapping of the image
        samplers' settings, as model folders and runs of 2026-12-05 and earlier hold): each flat key
        goes to every image sampler with a setting of that name (`cfg_scale` to both), after the parts
        given by name; a key neither has stays, for the loader to refuse by name."""
        if not isinstance(data, dict):
            return data
        out = {k: v for k, v in data.items() if k in ("diffusion", "tokens", "caption")}
        for key, value in data.items():
            owners = [
                part
                for part, kind in IMAGE_SAMPLERS.items()
                if key in _names(kind) and key not in ADDED_SINCE_FLAT.get(part, ())
            ]
            if key in out:
                continue
            if not owners:
                out[key] = value
            for part in owners:
                current = out.setdefault(part, {})
                if isinstance(current, dict):  # else the loader refuses the part itself
                    out[part] = {**current, key: value}
        return out


IMAGE_SAMPLERS = {"diffusion": DiffusionSampling, "tokens": TokenSampling}
# settings a sampler gained after flat sections stopped being written: a flat key of that name was the
# other sampler's (a flat `temperature` was always Token-Shuffle's)
ADDED_SINCE_FLAT = {"diffusion": ("temperature",)}


def _names(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}
