import torch

from mmfusion.diffusion.causal import (
    add_image,
    ar_loss_weights,
    ar_step_probs,
    even_group_sizes,
    random_group_sizes,
    sample_ar_steps,
    token_order,
)
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.masks import CLEAN, NOISY
from mmfusion.model.sequence import SequenceBuilder


def test_ar_step_distribution_decays_exponentially():
    p = ar_step_probs(64, 0.9)
    torch.testing.assert_close(p[1:] / p[:-1], torch.full((63,), 0.9, dtype=torch.float64))
    assert ar_step_probs(64, 0.0).tolist() == [1.0] + [0.0] * 63  # in-context DiT
    torch.testing.assert_close(ar_step_probs(8, 1.0), torch.full((8,), 1 / 8, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_ar_steps(DiffusionConfig(gamma=0.9), 16, g) for _ in range(4000)])
    expected = (ar_step_probs(16, 0.9) * torch.arange(1, 17)).sum().item()
    assert abs(draws.float().mean().item() - expected) < 0.25
    assert sample_ar_steps(DiffusionConfig(gamma=0.9, max_ar_steps=3), 16, g) <= 3


def test_one_step_fraction_mixes_in_one_step_images():
    """A share of S = 1 on top of the decaying distribution: the rest keeps its shape, every S its share."""
    p = ar_step_probs(16, 0.9, one_step_fraction=0.5)
    base = ar_step_probs(16, 0.9)
    torch.testing.assert_close(p[1:], 0.5 * base[1:])
    assert abs(p[0].item() - (0.5 + 0.5 * base[0].item())) < 1e-12 and abs(p.sum().item() - 1) < 1e-12
    assert ar_step_probs(16, 0.0, one_step_fraction=0.3).tolist() == [1.0] + [0.0] * 15
    g = torch.Generator().manual_seed(0)
    cfg = DiffusionConfig(gamma=0.9, one_step_fraction=0.5)
    draws = torch.tensor([sample_ar_steps(cfg, 16, g) for _ in range(4000)])
    assert abs((draws == 1).float().mean().item() - p[0].item()) < 0.03 and (draws == 16).any()


def test_group_sizes_partition_the_tokens():
    g = torch.Generator().manual_seed(0)
    for s in (1, 2, 7, 16):
        sizes = random_group_sizes(16, s, g)
        assert len(sizes) == s and sum(sizes) == 16 and min(sizes) >= 1
    assert even_group_sizes(10, 4) == [3, 3, 2, 2]


def test_orders_are_permutations():
    g = torch.Generator().manual_seed(0)
    for order in ("random", "raster", "block_raster"):
        o = token_order((8, 8), order, g, block=4)
        assert sorted(o.tolist()) == list(range(64))
    assert token_order((4, 4), "block_raster", block=2)[:4].tolist() == [0, 1, 4, 5]


def test_ar_loss_weights_fall_linearly_from_w_to_1():
    w = ar_loss_weights([2, 1, 3], 2.0)
    assert w.tolist() == [2.0, 2.0, 1.5, 1.0, 1.0, 1.0]
    assert ar_loss_weights([5], 2.0).tolist() == [2.0] * 5


def _image(cfg: DiffusionConfig, clean_last: bool = False, steps: int | None = None):
    sched = cfg.make_scheduler()
    x = torch.randn(16, 12)
    b = SequenceBuilder(12).text([1, 2, 3])
    add_image(b, x, cfg, sched, (4, 4), torch.Generator().manual_seed(3), clean_copy_of_last=clean_last, ar_steps=steps)
    return x, b.tensors(), sched


def test_training_sequence_layout_and_targets():
    cfg = DiffusionConfig()
    x, t, sched = _image(cfg, steps=4)
    kind = t["kind"]
    noisy, clean = kind == NOISY, kind == CLEAN
    assert noisy.sum() == 16 and 0 < clean.sum() < 16  # the last group has no clean copy
    # clean tokens are the image tokens at their positions; noisy = add_noise(x0, eps, t) with target eps
    assert torch.equal(t["values"][clean], x[t["image_pos"][clean]])
    ts = t["t"][noisy]
    assert (ts == ts[0]).all()  # one shared t per image
    x0 = x[t["image_pos"][noisy]]
    torch.testing.assert_close(t["values"][noisy], sched.add_noise(x0, t["targets"][noisy], ts))
    # one rotary position for the whole image, after the text
    assert (t["position_ids"][3:] == 3).all()


def test_per_group_t_and_v_prediction_and_k_times():
    cfg = DiffusionConfig(per_group_t=True, prediction_type="v_prediction", k_times=3)
    x, t, sched = _image(cfg, steps=3)
    noisy = t["kind"] == NOISY
    assert noisy.sum() == 3 * 16
    x0 = x[t["image_pos"][noisy]]
    noise = (t["values"][noisy] - sched.alphas_cumprod[t["t"][noisy]].sqrt()[:, None] * x0) / (
        1 - sched.alphas_cumprod[t["t"][noisy]]
    ).sqrt()[:, None]
    torch.testing.assert_close(t["targets"][noisy], sched.get_velocity(x0, noise, t["t"][noisy]), atol=1e-3, rtol=1e-3)
    # K noisy copies: each copy sees the shared clean prefix of earlier groups, never another copy
    from mmfusion.model.masks import generalized_causal_mask

    m = generalized_causal_mask(t["kind"][None], t["group"][None])[0]
    g = t["group"]
    q = noisy.nonzero().flatten()
    for i in q.tolist():
        seen_noisy = noisy & m[i]
        assert (g[seen_noisy] == g[i]).all()
    _assert_noisy_sees_exactly_the_earlier_clean_groups(t, k=3)


def _assert_noisy_sees_exactly_the_earlier_clean_groups(t, k):
    """Every noisy token (of any of the K copies) sees the clean copies of the AR groups before its own
    and no other clean token: not its own group's, which would hand it its answer."""
    from mmfusion.model.masks import generalized_causal_mask

    m = generalized_causal_mask(t["kind"][None], t["group"][None])[0]
    noisy, clean = t["kind"] == NOISY, t["kind"] == CLEAN
    ar_group = torch.full((int(t["image_pos"].max()) + 1,), -1)
    ar_group[t["image_pos"][noisy]] = t["group"][noisy] // k  # AR group of each image position
    clean_group = ar_group[t["image_pos"]]
    for i in noisy.nonzero().flatten().tolist():
        assert torch.equal(m[i] & clean, clean & (clean_group < ar_group[t["image_pos"][i]])), i


def test_noisy_tokens_see_exactly_the_clean_groups_before_theirs():
    for k in (1, 2):
        for clean_last in (False, True):
            _, t, _ = _image(DiffusionConfig(k_times=k), clean_last=clean_last, steps=5)
            _assert_noisy_sees_exactly_the_earlier_clean_groups(t, k)


def test_caption_order_keeps_clean_copy_of_last_group():
    _, t, _ = _image(DiffusionConfig(), clean_last=True, steps=4)
    assert (t["kind"] == CLEAN).sum() == 16


def test_raster_fraction_puts_that_share_of_multi_step_images_in_raster_order():
    from mmfusion.diffusion.causal import training_order

    g = torch.Generator().manual_seed(0)
    cfg = DiffusionConfig(raster_fraction=0.25)
    orders = [training_order(cfg, 4, g) for _ in range(4000)]
    assert abs(orders.count("raster") / 4000 - 0.25) < 0.03 and set(orders) == {"raster", "random"}
    assert {training_order(cfg, 1, g) for _ in range(100)} == {"random"}  # one AR step: no order drawn
    before = g.get_state()
    assert training_order(DiffusionConfig(), 4, g) == "random" and torch.equal(g.get_state(), before)
