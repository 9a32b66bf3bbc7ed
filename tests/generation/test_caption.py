"""Caption decoding: cached == uncached, batched == one by one, beam(1) == greedy."""

import pytest
import torch

from mmfusion.generation.caption import CaptionDecoder
from mmfusion.generation.settings import CaptionSampling
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel


@pytest.fixture(scope="module", params=[False, True], ids=["sincos", "image-rope"])
def decoder(request):
    torch.manual_seed(0)
    model = MMFusionModel(
        ModelConfig.from_name("tiny", image_grid=(4, 4), image_token_dim=12, image_rope=request.param)
    ).eval()
    return CaptionDecoder(model, bos=1, boi=3, eoi=4, eos=2)


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("method", ["greedy", "nucleus"])
def test_cached_equals_uncached(decoder, method):
    tokens = torch.randn(3, 16, 12)
    s = CaptionSampling(method=method, max_new_tokens=12, min_new_tokens=12, top_p=0.8)
    cached = decoder(tokens, s, _gens(3))
    assert all(len(c) == 12 for c in cached)
    assert decoder(tokens, s, _gens(3), use_cache=False) == cached


def test_batched_equals_one_by_one_and_beam1_is_greedy(decoder):
    torch.manual_seed(1)
    tokens = torch.randn(3, 16, 12) * 30  # loud enough that each image gets its own caption
    greedy = decoder(tokens, CaptionSampling(max_new_tokens=10))
    beam = decoder(tokens, CaptionSampling(method="beam", num_beams=3, max_new_tokens=10))
    assert len({tuple(c) for c in greedy}) == 3 and len({tuple(c) for c in beam}) == 3  # rows can't be swapped
    for i in range(3):
        assert decoder(tokens[i : i + 1], CaptionSampling(max_new_tokens=10)) == greedy[i : i + 1]
        assert decoder(tokens[i : i + 1], CaptionSampling(method="beam", num_beams=3, max_new_tokens=10)) == [beam[i]]
    assert decoder(tokens, CaptionSampling(method="beam", num_beams=1, max_new_tokens=10)) == greedy


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(decoder):
    tokens = torch.randn(2, 16, 12)
    greedy = decoder(tokens, CaptionSampling(max_new_tokens=6, min_new_tokens=6))
    beam = decoder(tokens, CaptionSampling(method="beam", num_beams=4, max_new_tokens=6, length_penalty=0.0))

    def logprob(row, ids):
        from mmfusion.model.sequence import collate

        prefix = decoder._prefix_rows(tokens[row : row + 1])[0]
        from mmfusion.generation.caption import _extend

        batch = collate([_extend(prefix, ids, int(prefix["position_ids"][-1]) + 1)])
        logits = decoder.model.text_logits(decoder.model(batch))[0].log_softmax(-1)
        start = prefix["kind"].shape[0] - 1
        return sum(logits[start + j, t].item() for j, t in enumerate(ids))

    for row in range(2):
        if len(beam[row]) == len(greedy[row]) == 6:
            assert logprob(row, beam[row]) >= logprob(row, greedy[row]) - 1e-5


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"method": "sample"}, "method: must be one of greedy, beam, nucleus, got 'sample'"),
        ({"max_new_tokens": 0}, "max_new_tokens: must be at least 1"),
        ({"min_new_tokens": 40}, r"min_new_tokens: must be within 0\.\.max_new_tokens \(32\), got 40"),
        ({"num_beams": 0}, "num_beams: must be at least 1"),
        ({"rerank_weight": -1.0}, "rerank_weight: must not be negative"),
        ({"rerank_timesteps": 0}, "rerank_timesteps: must be at least 1"),
        ({"top_p": 1.5}, r"top_p: must be in \(0, 1\]"),
        ({"temperature": 0.0}, "temperature: must be positive"),
    ],
)
def test_bad_caption_settings_are_refused(bad, message):
    from mmfusion.errors import ConfigError

    with pytest.raises(ConfigError, match="^" + message):
        CaptionSampling(**bad)


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_min_new_tokens_holds_back_eos_in_every_method(method):
    """A head that all but always says <eos>: without a minimum every caption is empty; with one, no
    method (beam search too) ends a caption before it."""
    torch.manual_seed(0)
    model = MMFusionModel(ModelConfig.from_name("tiny", image_grid=(4, 4), image_token_dim=12)).eval()
    plain = model.text_logits
    model.text_logits = lambda h: plain(h) + 20.0 * (torch.arange(model.cfg.vocab_size) == 2)
    decoder, tokens = CaptionDecoder(model, bos=1, boi=3, eoi=4, eos=2), torch.randn(3, 16, 12)
    settings = {"method": method, "num_beams": 3, "max_new_tokens": 8}
    assert decoder(tokens, CaptionSampling(**settings), _gens(3)) == [[], [], []]
    lengths = [len(c) for c in decoder(tokens, CaptionSampling(**settings, min_new_tokens=5), _gens(3))]
    assert lengths == [5, 5, 5]


@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_runs_no_pass_after_the_last_token(decoder, use_cache):
    """N new tokens take N passes (the prefix's, then one per token that is read): the loop once ran one
    more after the last token and threw its logits away. The ids are the uncached reference's, as before
    (the pass left out never reached them)."""
    tokens = torch.randn(2, 16, 12)
    s = CaptionSampling(max_new_tokens=7, min_new_tokens=7)
    model, passes = decoder.model, []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    try:
        ids = decoder(tokens, s, use_cache=use_cache)
    finally:
        hook.remove()
    assert len(passes) == 7 and all(len(c) == 7 for c in ids)
    assert ids == decoder(tokens, s, use_cache=not use_cache)
