import dataclasses

import pytest
import torch

from mmfusion.model.masks import CLEAN, NOISY, PAD
from mmfusion.model.sequence import SequenceBuilder, code_step, collate, image_block


@pytest.mark.parametrize("lengths", [(3, 3, 3), (2, 1, 4)], ids=["equal", "ragged"])
@pytest.mark.parametrize("kind", [CLEAN, NOISY])
def test_image_block_equals_one_builder_per_row(lengths, kind):
    """The sampler's per-step batch built as whole tensors is the batch the sequence builder gives."""
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randperm(16, generator=gen)[:n], torch.randn(n, 5, generator=gen)) for n in lengths]
    starts = [7 + i for i in range(len(rows))]
    samples = []
    for (pos, vals), start in zip(rows, starts):
        b = SequenceBuilder(5, start_position=start)
        if len(pos):
            n = len(pos)
            b.image(vals, pos, kind=kind, group=torch.zeros(n, dtype=torch.long), t=torch.zeros(n, dtype=torch.long))
        samples.append(b.tensors())
    expected = collate(samples)
    got = image_block(rows, kind, starts, 5)
    for field in dataclasses.fields(expected):
        a, b = getattr(got, field.name), getattr(expected, field.name)
        if b is None:
            assert a is None, field.name
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), field.name


def test_image_block_row_without_tokens_is_padding():
    """A row with nothing to add (editing, where an image has every token given) is one padding slot;
    a builder per row could not batch it with rows that have tokens."""
    rows = [(torch.tensor([3, 1]), torch.randn(2, 5)), (torch.zeros(0, dtype=torch.long), torch.zeros(0, 5))]
    got = image_block(rows, NOISY, [4, 6], 5)
    assert got.kind.tolist() == [[NOISY, NOISY], [PAD, PAD]]
    assert got.group.tolist() == [[0, 0], [-1, -1]] and got.position_ids.tolist() == [[4, 4], [0, 0]]
    assert image_block([rows[1]], CLEAN, [2], 5).kind.tolist() == [[PAD]]


def test_code_step_equals_one_builder_per_row():
    """The Token-Shuffle sampler's per-step batch (one fused token per row) is what the builder gives,
    in every field a forward pass reads."""
    codes = torch.randint(0, 50, (3, 4))
    starts = [5, 3, 4]
    rows = [
        SequenceBuilder(0, start_position=p + 2, code_width=4).codes(c[None], torch.tensor([2]))
        for c, p in zip(codes, starts)
    ]
    expected = collate([r.tensors() for r in rows])
    got = code_step(codes, 2, torch.tensor(starts) + 2)
    for field in ("kind", "ids", "values", "image_pos", "t", "group", "position_ids", "codes"):
        a, b = getattr(got, field), getattr(expected, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
