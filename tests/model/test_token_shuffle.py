"""Token-Shuffle: fusing codes, shapes of the heads, the CFG scheduler, AR sampling with a cache."""

import copy
import math

import pytest
import torch

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import ConfigError
from mmfusion.generation.settings import TokenSampling
from mmfusion.generation.tokens import ARImageSampler, cfg_scale_at, filter_logits
from mmfusion.model.config import ModelConfig
from mmfusion.model.masks import CODE
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import row_index, select_rows
from mmfusion.model.token_shuffle import fuse_grid, unfuse_grid
from mmfusion.training.objective import JointObjective
from tests.helpers import cache_growth


@pytest.mark.parametrize("s", [1, 2, 4])
def test_shuffle_then_unshuffle_is_identity(s):
    codes = torch.randint(0, 512, (3, 8, 8))
    fused = fuse_grid(codes, s)
    assert fused.shape == (3, 64 // (s * s), s * s)
    assert torch.equal(unfuse_grid(fused, s, (8, 8)), codes)
    if s == 2:  # the first fused token is the top-left 2 x 2 window
        assert fused[0, 0].tolist() == [codes[0, 0, 0], codes[0, 0, 1], codes[0, 1, 0], codes[0, 1, 1]]
    wide = torch.randint(0, 512, (2, 4, 12))  # not square: rows and columns must not trade places
    assert torch.equal(unfuse_grid(fuse_grid(wide, s), s, (4, 12)), wide)


def _cfg(s=2, bits=0, bitwise=True, window="independent"):
    k = 2**bits if bits else 64
    return ModelConfig.from_name(
        "tiny",
        image_codebook_size=k,
        code_bits=bits,
        bitwise_head=bitwise,
        shuffle=s,
        image_grid=(8 // s, 8 // s),
        window_head=window,
    )


def test_heads_shapes_and_bitwise_size():
    soft, bitwise = MMFusionModel(_cfg(bits=12, bitwise=False)), MMFusionModel(_cfg(bits=12))
    h = torch.randn(5, 64)
    assert soft.code_logits(h).shape == (5, 4, 4096)
    assert bitwise.code_logits(h).shape == (5, 4, 12)
    count = lambda m: sum(p.numel() for p in m.shuffle_out.head.parameters())  # noqa: E731
    assert count(bitwise) * 100 < count(soft)  # d binary classifiers instead of a 2^d-way softmax


@pytest.mark.parametrize("bits", [0, 6], ids=["softmax", "bitwise"])
def test_autoregressive_window_head_reads_earlier_slots_only(bits):
    torch.manual_seed(0)
    model = MMFusionModel(_cfg(s=2, bits=bits, window="autoregressive"))
    torch.nn.init.normal_(model.shuffle_out.context[-1].weight, std=0.5)  # make the context's effect visible
    h = torch.randn(3, 64)
    codes = torch.randint(0, 2**bits if bits else 64, (3, 4))
    base = model.code_logits(h, codes)
    for j in range(4):
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % (2**bits if bits else 64)
        moved = (model.code_logits(h, changed) - base).abs().amax(dim=(0, 2))  # per slot
        assert torch.all(moved[: j + 1] == 0), f"slot <= {j} saw the code of slot {j}"
        assert torch.all(moved[j + 1 :] > 0), f"later slots did not see the code of slot {j}"
    with pytest.raises(ValueError, match="codes of the window"):
        model.code_logits(h)
    # the independent head ignores codes; s = 1 has nothing to condition on and builds no context
    independent = MMFusionModel(_cfg(s=2, bits=bits))
    assert torch.equal(independent.code_logits(h, codes), independent.code_logits(h))
    assert MMFusionModel(_cfg(s=1, bits=bits, window="autoregressive")).shuffle_out.context is None


def test_cfg_schedules():
    assert [cfg_scale_at("constant", 4.0, i, 5) for i in range(5)] == [4.0] * 5
    assert [cfg_scale_at("linear", 4.0, i, 5) for i in range(5)] == [1.0, 1.75, 2.5, 3.25, 4.0]
    cos = [cfg_scale_at("cosine", 4.0, i, 5) for i in range(5)]
    assert cos[0] == 1.0 and cos[-1] == pytest.approx(4.0) and cos[2] == pytest.approx(2.5)
    assert cos[1] == pytest.approx(1 + 3 * (1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(ConfigError, match="^cfg_schedule: must be one of constant, linear, cosine, got 'exp'$"):
        TokenSampling(cfg_schedule="exp")


def test_filter_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("bits", [0, 6], ids=["softmax", "bitwise"])
@pytest.mark.parametrize("s,window", [(1, "independent"), (2, "independent"), (2, "autoregressive")])
def test_cached_equals_uncached_and_batched_equals_single(bits, s, window):
    torch.manual_seed(0)
    model = MMFusionModel(_cfg(s=s, bits=bits, window=window)).eval()
    conds, unconds = [[1, 5, 6, 3], [1, 7, 3]], [[1, 3], [1, 3]]
    sampler = ARImageSampler(
        model, TokenSampling(temperature=1.0, top_k=20 if not bits else 0, cfg_scale=3.0, cfg_schedule="linear")
    )
    gens = lambda seeds: [torch.Generator().manual_seed(x) for x in seeds]  # noqa: E731
    cached = sampler(conds, unconds, gens([0, 1]))
    uncached = sampler(conds, unconds, gens([0, 1]), use_cache=False)
    assert cached.shape == (2, 8, 8) and not cached.is_inference()  # sampled under inference mode, returned ordinary
    assert torch.equal(cached, uncached)
    assert torch.equal(sampler(conds[1:], unconds[1:], gens([1])), cached[1:])
    assert not torch.equal(sampler(conds, unconds, gens([2, 3])), cached)


@pytest.mark.parametrize("bits,window", [(0, "independent"), (6, "independent"), (0, "autoregressive")])
def test_loss_falls_on_shapes(bits, window):
    """A tiny Token-Shuffle model learns the codes of shapes images (from a fixed random VQ)."""
    from diffusers import VQModel

    from mmfusion.data.shapes import render_example
    from mmfusion.image_io import to_tensor
    from mmfusion.tokenizers.config import ImageTokenizerConfig
    from mmfusion.tokenizers.vq import BinaryQuantizer, VQTokenizer

    torch.manual_seed(0)
    vq = VQModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=6,
        vq_embed_dim=6,
        num_vq_embeddings=64,
        norm_num_groups=4,
    )
    if bits:
        vq.quantize = BinaryQuantizer(bits)
    tok = VQTokenizer(ImageTokenizerConfig(kind="vq", image_size=32), vq)
    images = torch.stack([to_tensor(render_example(0, "train", i)["image"], 32) for i in range(32)])
    codes = tok.encode(images)
    cfg = _cfg(s=2, bits=bits, window=window)
    model = MMFusionModel(cfg)
    obj = JointObjective(
        cfg,
        DiffusionConfig(),
        ObjectiveConfig(t2i_fraction=1.0, caption_dropout=0.0, bit_flip=0.05 if bits else 0.0),
        1,
        2,
        3,
        4,
    )
    caps = [[10 + i % 7, 20] for i in range(32)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = obj.build(codes, caps, None, torch.Generator().manual_seed(step))
        loss = obj.loss(model, batch)["image_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_code_loss_is_the_mean_cross_entropy_over_each_window_slot():
    """The fused-token loss equals an explicit loop: per predicted token, the mean over its s^2 slots of
    the slot's cross-entropy, weighted, averaged over predicted tokens."""
    torch.manual_seed(0)
    cfg = _cfg(s=2, bits=0, window="independent")
    model = MMFusionModel(cfg)
    torch.nn.init.normal_(model.shuffle_out.head.weight, std=1.0)  # logits far from uniform
    obj = JointObjective(cfg, DiffusionConfig(), ObjectiveConfig(t2i_fraction=1.0, caption_dropout=0.0), 1, 2, 3, 4)
    codes = torch.randint(0, cfg.image_codebook_size, (3, *[g * 2 for g in cfg.image_grid]))
    batch = obj.build(codes, [[10, 11], [12], [13, 14, 15]], None, torch.Generator().manual_seed(0))
    hidden = model(batch)
    got = obj._code_loss(model, hidden, batch, row_index(batch.weights > 0))
    at = (batch.weights > 0).nonzero().tolist()
    total = 0.0
    for b, i in at:
        logits = model.code_logits(hidden[b, i][None])[0]  # (W, K)
        slots = [
            torch.nn.functional.cross_entropy(logits[j][None], batch.code_labels[b, i, j][None])
            for j in range(logits.shape[0])
        ]
        total = total + torch.stack(slots).mean() * batch.weights[b, i]
    torch.testing.assert_close(got, total / len(at), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bits,window", [(0, "independent"), (6, "autoregressive")], ids=["softmax", "bitwise-ar"])
def test_bf16_weights_embed_codes_and_sample(bits, window):
    """`to_dtype(bfloat16)` on the Token-Shuffle path: codes (or their bits) embed and fuse in bf16, the
    heads stay float32; hidden states within bf16 rounding of float32's (0.4% measured), and sampling
    runs."""
    torch.manual_seed(0)
    cfg = _cfg(s=2, bits=bits, window=window)
    model = MMFusionModel(cfg).eval()
    bf = copy.deepcopy(model).to_dtype(torch.bfloat16)
    assert bf.shuffle_out.head.weight.dtype == torch.float32 and bf.shuffle_in.fuse[0].weight.dtype == torch.bfloat16
    obj = JointObjective(cfg, DiffusionConfig(), ObjectiveConfig(t2i_fraction=1.0, caption_dropout=0.0), 1, 2, 3, 4)
    codes = torch.randint(0, cfg.image_codebook_size, (4, 8, 8))
    batch = obj.build(codes, [[10, 20]] * 4, None, torch.Generator().manual_seed(0))
    rows = row_index(batch.kind == CODE)
    with torch.no_grad():
        ref, low = select_rows(model(batch), rows), select_rows(bf(batch), rows)
        logits = bf.code_logits(low, select_rows(batch.codes, rows))
    assert low.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.02
    sampler = ARImageSampler(bf, TokenSampling(temperature=1.0, top_k=0, cfg_scale=3.0, cfg_schedule="linear"))
    out = sampler([[1, 5, 6, 3], [1, 7, 3]], [[1, 3], [1, 3]], [torch.Generator().manual_seed(x) for x in (0, 1)])
    assert out.shape == (2, 8, 8) and 0 <= out.min() and out.max() < cfg.image_codebook_size


@pytest.mark.parametrize("window", ["independent", "autoregressive"])
def test_guidance_at_scale_zero_draws_from_the_unconditional_stream(window):
    """uncond + s (cond - uncond) on the logits: at s = 0 the codes drawn are those of the unconditional
    prefixes sampled without guidance, not those of the conditional ones."""
    torch.manual_seed(0)
    model = MMFusionModel(_cfg(s=2, window=window)).eval()
    with torch.no_grad():  # logits large enough that the two streams draw different codes
        for p in model.shuffle_out.parameters():
            p.mul_(20.0)
    conds, unconds = [[1, 5, 6, 3], [1, 7, 3]], [[1, 3], [1, 3]]
    gens = lambda: [torch.Generator().manual_seed(x) for x in (0, 1)]  # noqa: E731
    plain = ARImageSampler(model)
    uncond, cond = plain(unconds, None, gens()), plain(conds, None, gens())
    assert not torch.equal(uncond, cond)
    assert torch.equal(ARImageSampler(model, TokenSampling(cfg_scale=0.0))(conds, unconds, gens()), uncond)


@pytest.mark.parametrize("bits", [0, 6], ids=["softmax", "bitwise"])
def test_sampler_logits_equal_the_training_forward_with_and_without_cache(bits, monkeypatch):
    """Teacher-forced through a fixed code grid, the logits each sampling step draws from (cached and
    uncached, two prompts of different lengths batched) equal the training forward's logits at the
    same fused tokens: same positions, same causal mask, same cache contents."""
    from mmfusion.model.sequence import SequenceBuilder, collate

    torch.manual_seed(0)
    model = MMFusionModel(_cfg(s=2, bits=bits)).eval()
    conds = [[1, 5, 6, 3], [1, 7, 3]]
    grid = torch.randint(0, model.cfg.image_codebook_size, (2, 8, 8))
    fused = fuse_grid(grid, 2)  # (2, 16, 4)
    with torch.no_grad():
        rows = [
            SequenceBuilder(0, code_width=4).text(c).codes(f, torch.arange(16), loss_weight=1.0).tensors()
            for c, f in zip(conds, fused)
        ]
        batch = collate(rows)
        hidden = model(batch, mask=batch.mask())
        want = [model.code_logits(hidden[r][batch.weights[r] > 0]) for r in range(2)]  # (16, 4, K) each
    for use_cache in (True, False):
        drawn = []

        def teacher(logits, generators, drawn=drawn):
            drawn.append(logits.clone())
            return fused[:, len(drawn) - 1]

        sampler = ARImageSampler(model)
        monkeypatch.setattr(sampler, "_draw", teacher)
        assert torch.equal(sampler(conds, None, None, use_cache=use_cache), grid)
        got = torch.stack(drawn, 1)  # (2, 16, 4, K)
        for r in range(2):
            torch.testing.assert_close(got[r], want[r], atol=1e-5, rtol=1e-5)


def test_token_shuffle_sampling_never_grows_the_cache_inside_the_backbone(monkeypatch):
    """As for the other samplers (tests/test_pipeline.py): room is made before each pass, so `attend`,
    which a compiled backbone traces, never allocates."""
    grown = cache_growth(monkeypatch)
    torch.manual_seed(0)
    model = MMFusionModel(_cfg(s=2, window="autoregressive")).eval()
    gens = [torch.Generator().manual_seed(x) for x in (0, 1)]
    codes = ARImageSampler(model, TokenSampling(cfg_scale=3.0))([[1, 5, 6, 3], [1, 7, 3]], [[1, 3], [1, 3]], gens)
    assert codes.shape[0] == 2 and grown == []
