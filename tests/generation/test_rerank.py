"""Captions checked by drawing: the redraw error against a hand-built T2I row, batch independence, both
kinds of image, and the decoder picking by log-probability - weight x error."""

import pytest
import torch

from mmfusion.diffusion.causal import diffusion_target
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.generation.caption import CaptionDecoder
from mmfusion.generation.rerank import NOISE_SEED, redraw_error, rerank
from mmfusion.generation.settings import CaptionSampling
from mmfusion.model.config import ModelConfig
from mmfusion.model.masks import NOISY
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.prompts import Prompts
from mmfusion.model.sequence import SequenceBuilder, collate

BOS, EOS, BOI, EOI = 1, 2, 3, 4


def _continuous(prediction_type="sample"):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", image_grid=(4, 4), image_token_dim=12, image_rope=True)
    model = MMFusionModel(cfg).eval()
    torch.nn.init.normal_(model.image_head.weight, std=0.5)  # zero at init: every caption would score alike
    diffusion = DiffusionConfig(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    return model, Prompts(cfg, BOS, BOI), diffusion


def _reference(model, prompts, diffusion, x0, caption, timesteps):
    """The error built the slow way: one `SequenceBuilder` row per noise level, caption then the noisy image."""
    scheduler = diffusion.make_scheduler("ddpm")
    total = scheduler.config.num_train_timesteps
    n, c = x0.shape
    noise = torch.randn((timesteps, n, c), generator=torch.Generator().manual_seed(NOISE_SEED))
    errors = []
    for k, level in enumerate(torch.linspace(0.1, 0.9, timesteps)):
        t = torch.full((n,), int(level * total))
        noisy = scheduler.add_noise(x0, noise[k], t)
        row = (
            SequenceBuilder(c, image_span=model.cfg.image_span)
            .text(prompts.text(caption), prompt=True)
            .image(noisy, torch.arange(n), kind=NOISY, group=torch.zeros(n, dtype=torch.long), t=t)
            .end_image()
            .tensors()
        )
        batch = collate([row])
        with torch.no_grad():
            pred = model.image_output(model(batch)[batch.kind == NOISY]).float()
        target = diffusion_target(diffusion, scheduler, x0, noise[k], t)
        errors.append((pred - target).pow(2).mean())
    return torch.stack(errors).mean()


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_redraw_error_is_the_t2i_rows_prediction_error(prediction_type):
    model, prompts, diffusion = _continuous(prediction_type)
    x0 = torch.rand(2, 16, 12) * 2 - 1
    captions = [[10, 11, 12], [13]]
    with torch.no_grad():
        got = redraw_error(model, prompts, diffusion, x0, captions, timesteps=3, ends=(EOS, EOI))
    want = torch.stack([_reference(model, prompts, diffusion, x0[i], captions[i], 3) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_redraw_error_depends_on_the_pair_alone():
    model, prompts, diffusion = _continuous()
    x0 = torch.rand(4, 16, 12) * 2 - 1
    captions = [[10, 11], [12, 13, 14], [], [10, 11]]
    with torch.no_grad():
        together = redraw_error(model, prompts, diffusion, x0, captions, ends=(EOS, EOI))
        alone = torch.cat(
            [redraw_error(model, prompts, diffusion, x0[i : i + 1], captions[i : i + 1]) for i in range(4)]
        )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    # the caption matters: the same image under other words is scored differently
    with torch.no_grad():
        other = redraw_error(model, prompts, diffusion, x0[:1], [[20, 21, 22]])
    assert not torch.allclose(other, together[:1])


@pytest.mark.parametrize("bitwise", [False, True])
def test_code_error_is_the_codes_cross_entropy_after_the_caption(bitwise):
    torch.manual_seed(0)
    extra = {"code_bits": 6} if bitwise else {}
    cfg = ModelConfig.from_name("tiny", image_codebook_size=64, shuffle=2, image_grid=(2, 2), **extra)
    model = MMFusionModel(cfg).eval()
    prompts = Prompts(cfg, BOS, BOI)
    grids = torch.randint(0, 64, (3, 4, 4))
    captions = [[10, 11], [12], [13, 14, 15]]
    with torch.no_grad():
        together = redraw_error(model, prompts, DiffusionConfig(), grids, captions)
        alone = torch.cat(
            [redraw_error(model, prompts, DiffusionConfig(), grids[i : i + 1], captions[i : i + 1]) for i in range(3)]
        )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert (together > 0).all() and torch.isfinite(together).all()


def test_rerank_trades_log_probability_for_error():
    candidates = [[(-0.1, [5]), (-0.5, [6])], [(-0.2, [7])]]
    errors = torch.tensor([0.30, 0.10, 0.5])
    assert rerank(candidates, errors, 0.0) == [[5], [7]]  # beam search's own choice
    assert rerank(candidates, errors, 1.0) == [[5], [7]]  # -0.40 against -0.60
    assert rerank(candidates, errors, 3.0) == [[6], [7]]  # -1.00 against -0.80


def test_decoder_scores_each_candidate_with_its_own_image():
    """A scorer that favours, for each image, the candidate it names: the decoder must hand it every
    candidate beside the image it was decoded from, and pick by the combined score."""
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("tiny", image_grid=(4, 4), image_token_dim=12, image_rope=True)
    model = MMFusionModel(cfg).eval()
    tokens = torch.randn(3, 16, 12) * 30
    s = CaptionSampling(method="beam", num_beams=3, max_new_tokens=6)
    plain = CaptionDecoder(model, BOS, BOI, EOI, EOS)
    candidates = plain.beam_candidates(tokens, s)
    assert all(len(c) >= 2 for c in candidates)
    wanted = {i: c[-1][1] for i, c in enumerate(candidates)}  # each image's last-ranked candidate
    seen = []

    def scorer(images, ids, timesteps):
        assert timesteps == s.rerank_timesteps
        out = []
        for image, caption in zip(images, ids):
            owner = next(i for i in range(3) if torch.equal(image, tokens[i]))
            seen.append((owner, caption))
            out.append(0.0 if caption == wanted[owner] else 1.0)
        return torch.tensor(out)

    decoder = CaptionDecoder(model, BOS, BOI, EOI, EOS, scorer)
    assert decoder(tokens, s) == plain(tokens, s)  # weight 0: plain beam search, the scorer unused
    assert not seen
    picked = decoder(tokens, CaptionSampling(method="beam", num_beams=3, max_new_tokens=6, rerank_weight=1e6))
    assert picked == [wanted[i] for i in range(3)]
    assert sorted(seen) == sorted((i, ids) for i, c in enumerate(candidates) for _, ids in c)
    with pytest.raises(ValueError, match="scorer"):
        plain(tokens, CaptionSampling(method="beam", rerank_weight=1.0))


def test_pipeline_captions_by_the_combined_score(trained_tiny):
    """`pipe.caption(..., rerank_weight=w)` is beam search's candidate with the best log-probability -
    w x redraw error, computed here from the pieces."""
    from mmfusion.evaluation.demo_eval import shapes_test_rows
    from mmfusion.pipeline import MMFusion

    pipe = MMFusion.from_pretrained(trained_tiny)
    images = [r["image"] for r in shapes_test_rows(4)]
    t = pipe.text_tokenizer
    x = pipe.encode_images(images)
    s = pipe.caption_settings(method="beam", num_beams=3, max_new_tokens=8)
    candidates = CaptionDecoder(pipe.model, t.bos_id, t.boi_id, t.eoi_id, t.eos_id).beam_candidates(x, s)
    for weight in (0.0, 1.0, 1e4):
        want = []
        for i, ranked in enumerate(candidates):
            with torch.no_grad():
                err = redraw_error(
                    pipe.model,
                    pipe.prompts,
                    pipe.diffusion,
                    x[i : i + 1].expand(len(ranked), -1, -1),
                    [c for _, c in ranked],
                )
            best = max(range(len(ranked)), key=lambda j: ranked[j][0] - weight * float(err[j]))
            want.append(t.decode(ranked[best][1]))
        got = pipe.caption(images, method="beam", num_beams=3, max_new_tokens=8, rerank_weight=weight)
        assert got == want


def test_reranking_in_chunks_picks_the_same(monkeypatch):
    """Pairs are scored in chunks of bounded size (for large images); the choice does not depend on it."""
    import mmfusion.generation.caption as caption_module

    torch.manual_seed(2)
    model, prompts, diffusion = _continuous()
    tokens = torch.rand(3, 16, 12) * 2 - 1

    def scorer(images, ids, timesteps):
        calls.append(len(ids))
        with torch.no_grad():
            return redraw_error(model, prompts, diffusion, images, ids, timesteps, (EOS, EOI))

    s = CaptionSampling(method="beam", num_beams=3, max_new_tokens=5, rerank_weight=50.0, rerank_timesteps=2)
    decoder = CaptionDecoder(model, BOS, BOI, EOI, EOS, scorer)
    calls = []
    whole = decoder(tokens, s)
    assert len(calls) == 1
    monkeypatch.setattr(caption_module, "RERANK_TOKENS", 2 * 16 * 2)  # two pairs a call
    calls = []
    assert decoder(tokens, s) == whole
    assert len(calls) > 1 and max(calls) == 2
