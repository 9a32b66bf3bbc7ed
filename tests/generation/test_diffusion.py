import copy

import pytest
import torch

from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import ConfigError, UserError
from mmfusion.generation.diffusion import NextTokenDiffusionSampler
from mmfusion.generation.settings import DiffusionSampling, TokenSampling, with_changes
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel

CONDS, UNCONDS = [[1, 5, 6, 3], [1, 7, 3]], [[1, 3], [1, 3]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MMFusionModel(ModelConfig.from_name("tiny", image_grid=(4, 4), image_token_dim=12)).eval()
    torch.nn.init.normal_(m.image_head.weight, std=0.05)  # non-zero predictions
    return m


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("ar_steps", [1, 4, 16])
@pytest.mark.parametrize("sampler,cfg", [("ddpm", 1.0), ("ddim", 3.0)])
def test_cached_equals_uncached(model, ar_steps, sampler, cfg):
    s = DiffusionSampling(
        ar_steps=ar_steps, sampler=sampler, steps=4, cfg_scale=cfg, cfg_interval=(0.1, 0.9), cfg_until_step=2
    )
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), s)
    cached = smp(CONDS, UNCONDS, _gens([0, 1]))
    uncached = smp(CONDS, UNCONDS, _gens([0, 1]), use_cache=False)
    assert cached.shape == (2, 16, 12)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["random", "raster"])
def test_batched_equals_one_by_one_and_seeded(model, order):
    smp = NextTokenDiffusionSampler(
        model, DiffusionConfig(), DiffusionSampling(ar_steps=4, steps=3, order=order, cfg_scale=2.0)
    )
    both = smp(CONDS, UNCONDS, _gens([5, 6]))
    for i in range(2):
        alone = smp(CONDS[i : i + 1], UNCONDS[i : i + 1], _gens([5 + i]))
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(both, smp(CONDS, UNCONDS, _gens([5, 6])))
    assert not torch.allclose(both, smp(CONDS, UNCONDS, _gens([7, 8])))


def test_guidance_switches():
    s = DiffusionSampling(cfg_scale=3.0, cfg_interval=(0.2, 0.8), cfg_until_step=2)
    assert s.guides(500, 0, 1000) and s.guides(500, 1, 1000)
    assert not s.guides(500, 2, 1000)  # after AR step 2
    assert not s.guides(900, 0, 1000) and not s.guides(100, 0, 1000)  # outside the interval
    assert not DiffusionSampling(cfg_scale=1.0).guides(500, 0, 1000)


def test_known_tokens_are_kept(model):
    known = torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 5:] = True
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=3, steps=3))
    out = smp(CONDS, UNCONDS, _gens([0, 1]), known=known, known_mask=mask)
    assert torch.equal(out[mask], known[mask])
    assert not torch.allclose(out[~mask], known[~mask])
    ref = smp(CONDS, UNCONDS, _gens([0, 1]), known=known, known_mask=mask, use_cache=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_images_with_fewer_tokens_to_make_than_ar_steps(model):
    """Editing with masks of different sizes: image 0 has 2 tokens to make and is done after 2 of the 4
    AR steps, while image 1 goes on (its rows in the later steps' batches are empty). The cached path
    used to fail there, and DDPM drew noise for the widest row; both paths now agree, and each image is
    what it is alone."""
    known = torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :14] = True
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=4, steps=3, cfg_scale=2.0))
    out = smp(CONDS, UNCONDS, _gens([0, 1]), known=known, known_mask=mask)
    assert torch.equal(out[mask], known[mask])
    ref = smp(CONDS, UNCONDS, _gens([0, 1]), known=known, known_mask=mask, use_cache=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for i in range(2):
        alone = smp(
            CONDS[i : i + 1], UNCONDS[i : i + 1], _gens([i]), known=known[i : i + 1], known_mask=mask[i : i + 1]
        )
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_image_with_every_token_given_is_returned_as_given(model):
    known = torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0] = True
    mask[1, :8] = True
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=2, steps=3, cfg_scale=2.0))
    out = smp(CONDS, UNCONDS, _gens([0, 1]), known=known, known_mask=mask)
    assert torch.equal(out[0], known[0]) and torch.equal(out[mask], known[mask])
    torch.testing.assert_close(out, smp(CONDS, UNCONDS, _gens([0, 1]), known=known, known_mask=mask, use_cache=False))
    alone = smp(CONDS[1:], UNCONDS[1:], _gens([1]), known=known[1:], known_mask=mask[1:])
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)


def test_samples_are_ordinary_tensors(model):
    """Sampling runs under inference mode, but what it returns can be edited in place and used with
    autograd, like any tensor."""
    out = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(steps=2))(CONDS)
    assert not out.is_inference()
    out[0, 0] = 0.0
    (out * torch.ones_like(out, requires_grad=True)).sum().backward()


def test_too_many_ar_steps_is_refused(model):
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=17))
    with pytest.raises(UserError, match="ar_steps=17 exceeds the 16 tokens of an image: choose 1 to 16"):
        smp(CONDS, None, _gens([0, 1]))


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"steps": 0}, r"steps: \(denoising steps per AR step\) must be at least 1, got 0"),
        ({"ar_steps": 0}, "ar_steps: must be at least 1"),
        ({"sampler": "euler"}, "sampler: must be ddpm or ddim"),
        ({"order": "spiral"}, "order: must be one of random, raster, block_raster"),
        ({"cfg_interval": (0.8, 0.2)}, "cfg_interval: must be LO <= HI within"),
        ({"cfg_scale": -1.0}, "cfg_scale: must not be negative"),
        ({"eta": -0.5}, "eta: must not be negative"),
        ({"temperature": -0.1}, "temperature: must not be negative"),
        ({"lookahead": -1}, "lookahead: must not be negative"),
    ],
)
def test_bad_sampler_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match="^" + message):
        DiffusionSampling(**bad)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"top_p": 0.0}, r"top_p: must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k: must not be negative"),
        ({"temperature": 0.0}, "temperature: must be positive"),
        ({"cfg_schedule": "exp"}, "cfg_schedule: must be one of constant, linear, cosine"),
    ],
)
def test_bad_token_sampling_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match="^" + message):
        TokenSampling(**bad)


def test_each_sampler_takes_only_its_own_settings():
    """Changes by name are checked against the sampler's own type: a Token-Shuffle setting given to
    CausalFusion's sampler is refused with the settings it does take; None changes nothing."""
    base = DiffusionSampling(steps=20)
    assert with_changes(base, "x", ar_steps=4, order=None) == DiffusionSampling(steps=20, ar_steps=4)
    assert with_changes(base, "x", cfg_interval=[0.2, 0.8]).cfg_interval == (0.2, 0.8)
    refused = "^top_k: not a setting of x .DiffusionSampling.; its settings: ar_steps"
    with pytest.raises(ConfigError, match=refused):
        with_changes(base, "x", top_k=7)
    with pytest.raises(ConfigError, match="^ar_steps: not a setting of y .TokenSampling."):
        with_changes(TokenSampling(), "y", ar_steps=4)


@pytest.mark.parametrize("ar_steps", [1, 4])
def test_bf16_weights_sample_close_to_float32(model, ar_steps):
    """With bf16 weights (`to_dtype`) the sampler keeps its tokens in float32; what it draws stays within
    bf16 rounding of the float32 model's draw (0.3% relative error measured), cached and uncached alike."""
    s = DiffusionSampling(ar_steps=ar_steps, sampler="ddim", steps=4, cfg_scale=3.0)
    ref = NextTokenDiffusionSampler(model, DiffusionConfig(), s)(CONDS, UNCONDS, _gens([0, 1]))
    smp = NextTokenDiffusionSampler(copy.deepcopy(model).to_dtype(torch.bfloat16), DiffusionConfig(), s)
    cached = smp(CONDS, UNCONDS, _gens([0, 1]))
    uncached = smp(CONDS, UNCONDS, _gens([0, 1]), use_cache=False)
    assert cached.dtype == torch.float32
    assert ((cached - ref).norm() / ref.norm()).item() < 0.01
    assert ((cached - uncached).norm() / ref.norm()).item() < 0.005  # the same weights: closer still


@pytest.mark.parametrize("block", [2, 4])
def test_block_raster_sampling_uses_the_trained_block_size(model, block):
    """Training cuts block-raster orders into `diffusion.block_size` blocks; sampling one token per AR
    step must visit the grid in those same blocks."""
    from mmfusion.diffusion.causal import token_order

    smp = NextTokenDiffusionSampler(
        model,
        DiffusionConfig(order="block_raster", block_size=block),
        DiffusionSampling(ar_steps=16, order="block_raster"),
    )
    plan = smp._plan(1, _gens([0]), None)
    assert torch.cat(plan.groups[0]).tolist() == token_order((4, 4), "block_raster", block=block).tolist()


def test_guidance_at_scale_zero_is_the_unconditional_stream(model):
    """uncond + s (cond - uncond): at s = 0 the guided images are those of the unconditional prefixes
    sampled without guidance, and not those of the conditional ones (a swapped mix gives those)."""
    kw = {"ar_steps": 4, "sampler": "ddim", "steps": 3, "cfg_interval": (0.0, 1.0)}
    guided = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(cfg_scale=0.0, **kw))
    plain = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(cfg_scale=1.0, **kw))
    uncond, cond = plain(UNCONDS, None, _gens([0, 1])), plain(CONDS, None, _gens([0, 1]))
    assert (uncond - cond).abs().max() > 1e-3
    torch.testing.assert_close(guided(CONDS, UNCONDS, _gens([0, 1])), uncond, atol=1e-5, rtol=1e-5)


def test_bidirectional_prompt_cached_equals_uncached_and_matters():
    """A model whose prompt is read whole samples the same with and without the KV cache, and other
    images than the same weights with a causal prompt (the flag reaches the prefix pass)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", image_grid=(4, 4), image_token_dim=12, prompt_attention="bidirectional")
    bidir = MMFusionModel(cfg).eval()
    torch.nn.init.normal_(bidir.image_head.weight, std=0.05)
    causal = MMFusionModel(cfg.replace(prompt_attention="causal")).eval()
    causal.load_state_dict(bidir.state_dict())
    s = DiffusionSampling(ar_steps=4, steps=3, cfg_scale=2.0)
    smp = NextTokenDiffusionSampler(bidir, DiffusionConfig(), s)
    cached = smp(CONDS, UNCONDS, _gens([0, 1]))
    torch.testing.assert_close(cached, smp(CONDS, UNCONDS, _gens([0, 1]), use_cache=False), atol=1e-4, rtol=1e-4)
    other = NextTokenDiffusionSampler(causal, DiffusionConfig(), s)(CONDS, UNCONDS, _gens([0, 1]))
    assert (cached - other).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_x0_reaches_the_scheduler_clipped(model, sampler, monkeypatch):
    """With x0 prediction and clip_sample, the scheduler is given the guided x0 already in [-1, 1]: DDIM
    computes its noise estimate from the x0 it is given before it clips, so an x0 pushed out of range by
    guidance would spoil every later step (DDPM clips before its posterior and is unchanged)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    seen = []
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    step = cls.step

    def recording(self, out, *args, **kwargs):
        seen.append(float(out.abs().max()))
        return step(self, out, *args, **kwargs)

    monkeypatch.setattr(cls, "step", recording)
    big = copy.deepcopy(model)
    torch.nn.init.normal_(big.image_head.weight, std=2.0)  # x0 predictions far outside [-1, 1]
    diffusion = DiffusionConfig(prediction_type="sample", clip_sample=True, gamma=0.9)
    s = DiffusionSampling(ar_steps=1, sampler=sampler, steps=5, cfg_scale=3.0)
    out = NextTokenDiffusionSampler(big, diffusion, s)(CONDS, UNCONDS, _gens([0, 1]))
    assert seen and max(seen) <= 1.0 and out.abs().max() <= 1.0
    seen.clear()
    unclipped = DiffusionConfig(prediction_type="sample", clip_sample=False, gamma=0.9)
    NextTokenDiffusionSampler(big, unclipped, s)(CONDS, UNCONDS, _gens([0, 1]))
    assert max(seen) > 1.0  # without clip_sample the prediction goes through as it is


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_temperature_scales_the_noise_each_step_adds(model, sampler):
    """x_prev(tau) = mean + tau * (x_prev(1) - mean): tau 1 is the scheduler's own step, tau 0 its
    noiseless mean, the same whatever the generator."""
    cfg = DiffusionConfig(prediction_type="sample", clip_sample=True)
    scheduler = cfg.make_scheduler(sampler)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[4])
    pred, x = torch.rand(2, 4, 12) * 2 - 1, torch.randn(2, 4, 12)

    def step(tau, seeds):
        s = DiffusionSampling(sampler=sampler, eta=1.0, temperature=tau)
        return NextTokenDiffusionSampler(model, cfg, s)._step(scheduler, pred, t, x, _gens(seeds))

    kwargs = {"eta": 1.0} if sampler == "ddim" else {}
    plain = scheduler.step(pred, t, x, generator=_gens([3, 4]), **kwargs).prev_sample
    torch.testing.assert_close(step(1.0, [3, 4]), plain)
    mean = step(0.0, [3, 4])
    torch.testing.assert_close(mean, step(0.0, [8, 9]))  # no noise left to draw
    assert not torch.allclose(mean, plain)
    torch.testing.assert_close(step(0.4, [3, 4]) - mean, 0.4 * (plain - mean), atol=1e-5, rtol=1e-5)


def test_temperature_sampling_is_cached_batched_and_changes_the_images(model):
    s = DiffusionSampling(ar_steps=4, steps=3, temperature=0.3)
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), s)
    both = smp(CONDS, None, _gens([5, 6]))
    torch.testing.assert_close(both, smp(CONDS, None, _gens([5, 6]), use_cache=False), atol=1e-4, rtol=1e-4)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], smp(CONDS[i : i + 1], None, _gens([5 + i])), atol=1e-5, rtol=1e-5)
    hot = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=4, steps=3))
    assert not torch.allclose(both, hot(CONDS, None, _gens([5, 6])))


def test_lookahead_keeps_the_group_of_a_larger_draw(model):
    """With lookahead 12 at S = 4 the first AR step denoises all 16 tokens, in the order and with the
    noise that one AR step uses, and keeps its group of 4: those equal the one-step image's tokens
    there, while the later groups are drawn again given them. At S = 1 there is nothing ahead."""
    one = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=1, steps=3))
    ahead = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=4, steps=3, lookahead=12))
    first = ahead._plan(2, _gens([5, 6]), None).groups
    whole, kept = one(CONDS, None, _gens([5, 6])), ahead(CONDS, None, _gens([5, 6]))
    for i in range(2):
        group, rest = first[i][0], torch.cat(first[i][1:])
        torch.testing.assert_close(kept[i, group], whole[i, group], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(kept[i, rest], whole[i, rest])
    plain = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=4, steps=3))
    assert not torch.allclose(kept, plain(CONDS, None, _gens([5, 6])))
    at_one = NextTokenDiffusionSampler(model, DiffusionConfig(), DiffusionSampling(ar_steps=1, steps=3, lookahead=5))
    assert torch.equal(at_one(CONDS, None, _gens([5, 6])), whole)


@pytest.mark.parametrize("order,lookahead", [("random", 3), ("raster", 20)])
def test_lookahead_is_cached_batched_and_guided(model, order, lookahead):
    s = DiffusionSampling(ar_steps=5, steps=3, order=order, cfg_scale=2.0, lookahead=lookahead, temperature=0.5)
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), s)
    both = smp(CONDS, UNCONDS, _gens([5, 6]))
    torch.testing.assert_close(both, smp(CONDS, UNCONDS, _gens([5, 6]), use_cache=False), atol=1e-4, rtol=1e-4)
    for i in range(2):
        alone = smp(CONDS[i : i + 1], UNCONDS[i : i + 1], _gens([5 + i]))
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_lookahead_with_given_tokens_keeps_them(model):
    known = torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :14] = True
    mask[1, 3:9] = True
    s = DiffusionSampling(ar_steps=4, steps=3, lookahead=4)
    smp = NextTokenDiffusionSampler(model, DiffusionConfig(), s)
    out = smp(CONDS, None, _gens([0, 1]), known=known, known_mask=mask)
    assert torch.equal(out[mask], known[mask])
    ref = smp(CONDS, None, _gens([0, 1]), known=known, known_mask=mask, use_cache=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
