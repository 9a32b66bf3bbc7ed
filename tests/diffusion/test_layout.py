"""The whole-batch layout makes the batch the per-sample path makes, element by element."""

import dataclasses

import pytest
import torch

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.diffusion.layout import place
from mmfusion.model.config import ModelConfig
from mmfusion.training.objective import JointObjective

DEMO = DiffusionConfig(
    beta_schedule="squaredcos_cap_v2",
    prediction_type="sample",
    clip_sample=True,
    gamma=0.9,
    one_step_fraction=0.5,
    raster_fraction=0.5,
)
CASES = {
    "demo": (DEMO, ObjectiveConfig(t2i_fraction=0.85, text_loss_weight=0.02, pack_length=96), (4, 4)),
    "demo, one row per sample": (DEMO, ObjectiveConfig(t2i_fraction=0.85, pack_length=0), (4, 4)),
    "gamma 0": (DiffusionConfig(gamma=0.0), ObjectiveConfig(pack_length=64), (4, 4)),
    "K = 2, t per group, block order, caption image loss x 0.3": (
        DiffusionConfig(gamma=0.9, per_group_t=True, k_times=2, order="block_raster", block_size=2),
        ObjectiveConfig(t2i_fraction=0.5, caption_ar_steps=None, caption_image_loss_weight=0.3, pack_length=50),
        (4, 4),
    ),
    "transfusion, logit-normal t, v": (
        DiffusionConfig(gamma=0.9, t_sampling="logit_normal", prediction_type="v_prediction"),
        ObjectiveConfig(t2i_fraction=0.5, baseline="transfusion", pack_length=64),
        (4, 4),
    ),
    "uniform S, 3 caption steps, 2 x 3 grid, no image rope": (
        DiffusionConfig(gamma=1.0),
        ObjectiveConfig(t2i_fraction=0.3, caption_ar_steps=3, pack_length=0),
        (2, 3),
    ),
}


def _objective(diffusion, objective, grid, rope=True, token_dim=12):
    cfg = ModelConfig(
        vocab_size=50, dim=32, n_layers=1, n_heads=2, image_token_dim=token_dim, image_grid=grid, image_rope=rope
    )
    return JointObjective(cfg, diffusion, objective, 1, 2, 3, 4)


def _inputs(n_tokens, token_dim, batch=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n_tokens, token_dim, generator=g)
    lengths = torch.randint(0, 9, (batch,), generator=g).tolist()  # empty captions too
    captions = [torch.randint(5, 50, (n,), generator=g).tolist() for n in lengths]
    return tokens, captions


def assert_same_batch(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert (x is None) == (y is None), field.name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, (field.name, x.shape, y.shape)
            assert torch.equal(x, y), field.name


@pytest.mark.parametrize("case", list(CASES))
def test_whole_batch_layout_equals_the_per_sample_path(case):
    diffusion, objective, grid = CASES[case]
    obj = _objective(diffusion, objective, grid, rope=grid != (2, 3))
    assert obj.layout is not None
    tokens, captions = _inputs(grid[0] * grid[1], 12)
    for gens in (
        lambda: [torch.Generator().manual_seed(1000 + i) for i in range(len(tokens))],  # one per sample
        lambda: torch.Generator().manual_seed(7),  # one shared by all
    ):
        fast = obj.build(tokens, captions, None, gens())
        slow = obj.build_per_sample(tokens, captions, None, gens())
        assert_same_batch(fast, slow)
    kinds = set(fast.kind.unique().tolist())
    assert len(kinds) >= 3  # text, image and padding all present: the comparison covers every kind


def test_the_batch_has_noisy_and_clean_tokens_and_caption_labels():
    """The cases above are not vacuous: the demo's batch has S > 1 images (clean tokens), caption-order
    samples (text labels) and several samples per packed row."""
    diffusion, objective, grid = CASES["demo"]
    tokens, captions = _inputs(16, 12, batch=64)
    batch = _objective(diffusion, objective, grid).build(tokens, captions, None, torch.Generator().manual_seed(3))
    from mmfusion.model.masks import CLEAN, NOISY

    assert (batch.kind == CLEAN).any() and (batch.kind == NOISY).sum() == 64 * 16
    assert (batch.labels >= 0).any()
    assert int(batch.segment.max()) >= 1


def test_class_conditions_and_codes_keep_the_per_sample_path():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, image_token_dim=12, num_classes=3)
    assert JointObjective(cfg, DEMO, ObjectiveConfig(condition="class"), 1, 2, 3, 4).layout is None
    codes = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, image_codebook_size=16, image_grid=(4, 4))
    assert codes.discrete and JointObjective(codes, DEMO, ObjectiveConfig(), 1, 2, 3, 4).layout is None


def test_place_packs_first_fit_decreasing():
    # lengths 5, 9, 3, 7 into rows of 10: 9 -> row 0, 7 -> row 1, 5 -> row 2, 3 -> row 1 (first with room)
    starts, index, rows, width = place([5, 9, 3, 7], 10)
    assert (rows, width) == (3, 10)
    assert starts == [2 * 10 + 0, 0, 1 * 10 + 7, 1 * 10 + 0]
    assert index == [0, 0, 1, 0]
    assert place([5, 12], 10) == ([12, 0], [0, 0], 2, 12)  # too long for a row: a row of its own
    assert place([5, 9], 0) == ([0, 9], [0, 0], 2, 9)  # one padded row per sample


def test_training_batches_equal_those_of_row_reads_and_the_per_sample_path(tmp_path, monkeypatch):
    """What a training step trains on, for the same seed and step, whichever path made it: rows read
    one by one and laid out per sample (the path before decoded rows and the whole-batch layout), or
    decoded rows laid out for the whole batch. Under the demo's objective, at three steps."""
    from mmfusion.config import load_config
    from mmfusion.data.datamodule import (
        CaptionedImages,
        DecodedRows,
        MMFusionDataModule,
        StepBatchSampler,
        collate_items,
    )
    from mmfusion.training.module import MMFusionModule
    from tests.conftest import TINY_RUN

    demo = [
        "diffusion.gamma=0.9",
        "diffusion.one_step_fraction=0.5",
        "diffusion.raster_fraction=0.5",
        "objective.t2i_fraction=0.6",
        "objective.pack_length=96",
    ]
    cfg = load_config(None, [*TINY_RUN, *demo, "data.shapes_pair_fraction=0.5", f"train.out={tmp_path}"])
    data = MMFusionDataModule(cfg.data, 32, tmp_path)
    decoded = data.dataset("train")
    assert isinstance(decoded, DecodedRows)
    rows = CaptionedImages(data.load()["train"], data.text_tokenizer(), 32, cfg.data.max_text_len)
    module = MMFusionModule(cfg, data.text_tokenizer())
    layout = module.objective.layout
    sampler = StepBatchSampler(len(rows), 8, seed=0)
    for step in range(3):
        monkeypatch.setattr(MMFusionModule, "global_step", property(lambda self, s=step: s))
        indices = sampler.indices(step)
        module.objective.layout = layout
        new = module.token_batch(collate_items(decoded.__getitems__(indices)))
        module.objective.layout = None
        old = module.token_batch(collate_items([rows[i] for i in indices]))
        assert_same_batch(new, old)
