"""The joint objective's batches: packing several samples into one row changes nothing but padding."""

import dataclasses

import pytest
import torch

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.model.config import ModelConfig
from mmfusion.model.masks import PAD
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.training.objective import JointObjective


def _objective(cfg, pack_length):
    return JointObjective(
        cfg,
        DiffusionConfig(gamma=0.5),
        ObjectiveConfig(t2i_fraction=0.5, caption_dropout=0.2, pack_length=pack_length),
        1,
        2,
        3,
        4,
    )


def _inputs(cfg, n):
    g = torch.Generator().manual_seed(0)
    captions = [
        torch.randint(10, cfg.vocab_size, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 9, (n,), generator=g)
    ]
    if cfg.discrete:
        grid = [x * cfg.shuffle for x in cfg.image_grid]
        return torch.randint(0, cfg.image_codebook_size, (n, *grid), generator=g), captions
    return torch.randn(n, cfg.num_image_tokens, cfg.image_token_dim, generator=g), captions


@pytest.mark.parametrize("discrete", [False, True])
def test_packed_batch_gives_the_padded_batch_losses(discrete):
    torch.manual_seed(0)
    extra = {"image_codebook_size": 64, "shuffle": 2, "image_grid": (2, 2)} if discrete else {"image_grid": (4, 4)}
    cfg = ModelConfig.from_name("tiny", image_rope=True, **extra)
    model = MMFusionModel(cfg)
    torch.nn.init.normal_(model.image_head.weight, std=0.05)
    tokens, captions = _inputs(cfg, 12)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(12)]  # noqa: E731
    padded = _objective(cfg, 0).build(tokens, captions, None, gens())
    packed = _objective(cfg, 96).build(tokens, captions, None, gens())
    assert len(packed) < len(padded)  # fewer rows ...
    assert int(packed.valid().sum()) == int(padded.valid().sum())  # ... holding the same tokens
    assert (packed.kind == PAD).sum() < (padded.kind == PAD).sum()
    assert packed.kind.shape[1] <= 96
    want, got = _objective(cfg, 0).loss(model, padded), _objective(cfg, 96).loss(model, packed)
    for key in ("image_loss", "text_loss", "loss"):
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
    assert want["text_loss"] > 0 and want["image_loss"] > 0


def test_packed_samples_do_not_see_each_other():
    cfg = ModelConfig.from_name("tiny", image_grid=(4, 4))
    tokens, captions = _inputs(cfg, 6)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    packed = _objective(cfg, 128).build(tokens, captions, None, gens)
    assert len(packed) < 6
    mask, seg = packed.mask(), packed.segment
    across = (seg[:, :, None] != seg[:, None, :]) & (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    assert across.any() and not (mask & across).any()
    # inside a sample, the mask is that sample's own generalized causal mask
    for r in range(len(packed)):
        for s in seg[r].unique().tolist():
            if s < 0:
                continue
            idx = (seg[r] == s).nonzero()[:, 0]
            alone = dataclasses.replace(
                packed, segment=None, kind=packed.kind[r : r + 1, idx], group=packed.group[r : r + 1, idx]
            )
            assert torch.equal(mask[r][idx][:, idx], alone.mask()[0])


@pytest.mark.parametrize("caption_ar_steps,prompt_attention", [(1, "causal"), (None, "causal"), (1, "bidirectional")])
def test_caption_order_text_reads_the_image_as_captioning_does(caption_ar_steps, prompt_attention):
    """In caption-order samples the text's logits equal those of captioning at inference (the image as
    one clean group, `CaptionDecoder`), even where T2I draws many AR steps (gamma 0.9). Drawing the
    caption-order image's AR steps as for T2I (`caption_ar_steps: null`) gives the text clean tokens
    under a block-causal mask that captioning never shows it."""
    from mmfusion.generation.caption import CaptionDecoder
    from mmfusion.model.masks import CLEAN
    from mmfusion.model.sequence import IGNORE, SequenceBuilder, collate

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", image_grid=(4, 4), image_rope=True, prompt_attention=prompt_attention)
    model = MMFusionModel(cfg).eval()
    tokens, captions = _inputs(cfg, 8)
    bos, eos, boi, eoi = 1, 2, 3, 4
    objective = ObjectiveConfig(t2i_fraction=0.0, caption_ar_steps=caption_ar_steps)
    obj = JointObjective(cfg, DiffusionConfig(gamma=0.9), objective, bos, eos, boi, eoi)
    batch = obj.build(tokens, captions, None, [torch.Generator().manual_seed(i) for i in range(8)])
    with torch.no_grad():
        train = model.text_logits(model(batch, mask=obj_mask(obj, batch))[batch.labels != IGNORE])

        decoder, n = CaptionDecoder(model, bos, boi, eoi, eos), cfg.num_image_tokens
        rows = []
        for x, prefix, caption in zip(tokens, decoder._prefix_rows(tokens), captions):
            b = SequenceBuilder(cfg.image_token_dim, image_span=cfg.image_span).text([bos, boi], prompt=True)
            b.image(x, torch.arange(n), kind=CLEAN, group=torch.zeros(n, dtype=torch.long))
            row = b.end_image().text([eoi]).text([*caption, eos], loss=True).tensors()
            assert all(torch.equal(row[k][: len(prefix["kind"])], v) for k, v in prefix.items() if k != "labels")
            rows.append(row)
        infer = collate(rows)
        infer_logits = model.text_logits(model(infer)[infer.labels != IGNORE])
    assert torch.equal(batch.labels[batch.labels != IGNORE], infer.labels[infer.labels != IGNORE])
    if caption_ar_steps == 1:
        torch.testing.assert_close(train, infer_logits, atol=1e-5, rtol=1e-5)
    else:
        assert (train - infer_logits).abs().max() > 1e-4


def obj_mask(obj: JointObjective, batch):  # noqa: ANN001, ANN201
    """The mask the objective trains with."""
    return batch.mask(obj.text_sees_noisy, obj.model_cfg.bidirectional_prompt)


def test_a_term_without_data_is_left_out_not_zero():
    """A batch without caption-order samples has no text loss (the logs would read 0), and its total is
    the image loss alone; a batch with them has both, weighted."""
    cfg = ModelConfig.from_name("tiny", image_grid=(4, 4))
    model = MMFusionModel(cfg)
    tokens, captions = _inputs(cfg, 4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    make = lambda t2i: JointObjective(  # noqa: E731
        cfg, DiffusionConfig(), ObjectiveConfig(t2i_fraction=t2i, text_loss_weight=0.5), 1, 2, 3, 4
    )
    image_only = make(1.0).loss(model, make(1.0).build(tokens, captions, None, gens()))
    assert set(image_only) == {"image_loss", "loss"} and torch.equal(image_only["loss"], image_only["image_loss"])
    both = make(0.0).loss(model, make(0.0).build(tokens, captions, None, gens()))
    assert set(both) == {"image_loss", "text_loss", "loss"}
    torch.testing.assert_close(both["loss"], both["image_loss"] + 0.5 * both["text_loss"])


def test_logs_leave_a_gap_where_a_batch_had_no_text(tmp_path):
    """In the training logs, a step without caption-order samples has no text loss (NaN), and its loss
    is the image loss; a step with them has both. Lightning would otherwise repeat the last value."""
    import csv
    import math

    from mmfusion.config import load_config
    from mmfusion.training.run import train
    from tests.conftest import TINY_RUN

    overrides = [*TINY_RUN, "objective.t2i_fraction=0.8", "data.batch_size=2", "train.max_steps=16"]
    train(load_config(None, [*overrides, "train.log_every_n_steps=1", f"train.out={tmp_path}"]))
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/*/metrics.csv")))))
    rows = [r for r in rows if r.get("train/loss")]
    assert len(rows) == 16
    with_text = [r for r in rows if r["train/text_loss"] and not math.isnan(float(r["train/text_loss"]))]
    without = [r for r in rows if r not in with_text]
    assert with_text and without  # both kinds of steps happened
    for r in without:
        assert float(r["train/loss"]) == float(r["train/image_loss"])
    for r in with_text:
        assert float(r["train/loss"]) > float(r["train/image_loss"])  # the weighted text loss was added


def test_the_bar_shows_a_missing_term_at_its_last_measured_value():
    from types import SimpleNamespace

    from mmfusion.training.callbacks import step_progress_bar

    bar = step_progress_bar()
    module = SimpleNamespace(last_logged={"train/text_loss": torch.tensor(5.5), "train/loss": torch.tensor(2.0)})
    trainer = SimpleNamespace(progress_bar_metrics={"train/text_loss": float("nan"), "train/loss": 1.5}, loggers=[])
    assert bar.get_metrics(trainer, module) == {"train/text_loss": 5.5, "train/loss": 1.5}
    assert "train/image_loss" not in bar.get_metrics(
        SimpleNamespace(progress_bar_metrics={"train/image_loss": float("nan")}, loggers=[]), module
    )
