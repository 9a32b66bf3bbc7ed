"""Property-based tests (hypothesis) over the mask builder, the text tokenizer and the data loader."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfusion.model.masks import CLEAN, NOISY, PAD, TEXT, generalized_causal_mask

KINDS = st.sampled_from([PAD, TEXT, CLEAN, NOISY])


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 24))
    kind = draw(st.lists(KINDS, min_size=n, max_size=n))
    group = [draw(st.integers(0, 4)) if k in (CLEAN, NOISY) else -1 for k in kind]
    return torch.tensor([kind]), torch.tensor([group])


@settings(max_examples=200, deadline=None)
@given(layouts(), st.booleans())
def test_mask_invariants(layout, text_sees_noisy):
    kind, group = layout
    m = generalized_causal_mask(kind, group, text_sees_noisy)[0]
    k, g = kind[0], group[0]
    n = len(k)
    assert m.diagonal().all()  # everyone sees itself: no empty row
    for q in range(n):
        for key in range(n):
            if q == key:
                continue
            if k[key] == PAD or k[q] == PAD:  # padding is invisible and blind
                assert not m[q, key]
            if k[key] in (TEXT,) and m[q, key]:  # text is only ever seen causally
                assert key < q
            if k[q] == NOISY and k[key] == CLEAN:  # never its own clean copy or a later group
                assert m[q, key] == (g[key] < g[q])
            if k[q] == NOISY and k[key] == NOISY:
                assert m[q, key] == (g[key] == g[q])
            if k[q] == CLEAN and k[key] == NOISY:
                assert not m[q, key]
            if k[q] == TEXT and k[key] == NOISY:
                assert m[q, key] == (text_sees_noisy and key < q)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300), st.integers(0, 40))
def test_tokenizer_round_trip_and_truncation(text, max_len):
    tok = _tokenizer()
    ids = tok.encode(text, max_len=0)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text.encode("utf-8", "replace").decode("utf-8").strip()
    if max_len:
        assert len(tok.encode(text, max_len=max_len)) == min(max_len, len(ids))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_tokenizer_never_crashes_on_bytes(raw):
    tok = _tokenizer()
    ids = tok.encode(raw)
    assert isinstance(tok.decode(ids), str)


_TOK = []


def _tokenizer():
    if not _TOK:
        from mmfusion.tokenizers.text import TextTokenizer

        _TOK.append(
            TextTokenizer.train(["a red circle to the left of a blue square", "a green triangle"] * 5, vocab_size=280)
        )
    return _TOK[0]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(1, 8), st.integers(0, 3), st.integers(0, 100), st.integers(1, 3))
def test_step_batch_sampler_partitions_each_epoch(n_extra, batch, seed, start, world):
    """Within an epoch every row is used at most once, ranks split each global batch without overlap,
    and a sampler started at step k yields exactly what a sampler from 0 yields at step k."""
    from mmfusion.data.datamodule import StepBatchSampler

    n = batch * world + n_extra
    samplers = [StepBatchSampler(n, batch, seed, 0, 10**6, world, r) for r in range(world)]
    spe = samplers[0].steps_per_epoch
    seen = []
    for step in range(spe):
        shares = [s.indices(step) for s in samplers]
        assert all(len(x) == batch for x in shares)
        flat = [i for x in shares for i in x]
        assert len(set(flat)) == len(flat)
        seen += flat
    assert len(set(seen)) == len(seen) and all(0 <= i < n for i in seen)
    late = StepBatchSampler(n, batch, seed, start, 10**6, world, 0)
    assert next(iter(late)) == samplers[0].indices(start)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=60), st.just(""), st.just("   ")), min_size=0, max_size=5))
def test_loader_rows_never_crash(captions):
    """Any caption list gives either a usable row or a counted skip, never an exception."""
    import datasets
    from PIL import Image

    from mmfusion.data.datamodule import CaptionedImages, collate_items

    ds = datasets.Dataset.from_list(
        [{"image": Image.new("RGB", (8, 8)), "captions": captions}],
        features=datasets.Features(
            {"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))}
        ),
    )
    item = CaptionedImages(ds, _tokenizer(), 16, 35)[0]
    batch = collate_items([item])
    usable = [c for c in captions if c.strip()]
    assert batch["size"] == (1 if usable else 0)
    assert len(batch["skipped"]) == (0 if usable else 1)
