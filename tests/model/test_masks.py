"""Hand-worked cases for every rule of the generalized causal mask (SPEC 3.5)."""

import torch

from mmfusion.model.masks import CLEAN, CODE, NOISY, PAD, PROMPT, TEXT, generalized_causal_mask, layout

# T2I with a 2-token condition and groups of sizes 2, 1, 2:
# index: 0 1 | 2 3 (clean g0) | 4 (clean g1) | 5 6 (noisy g0) | 7 (noisy g1) | 8 9 (noisy g2)
T2I = [
    # 0  1  2  3  4  5  6  7  8  9
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # text 0: causal
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # text 1
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # clean g0: condition + clean g0
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # clean g1: condition + clean g0..g1
    [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],  # noisy g0: condition + itself only (no clean copy of g0)
    [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 1, 0, 0],  # noisy g1: condition + clean g0 + itself
    [1, 1, 1, 1, 1, 0, 0, 0, 1, 1],  # noisy g2: condition + clean g0, g1 + itself
    [1, 1, 1, 1, 1, 0, 0, 0, 1, 1],
]

# caption order: 2 prefix tokens | clean g0 (1) clean g1 (1) | noisy g0 (1) noisy g1 (1) | 2 caption tokens
CAPTION = [
    # 0  1  2  3  4  5  6  7
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],  # clean g0
    [1, 1, 1, 1, 0, 0, 0, 0],  # clean g1 (the last group's clean copy, for the caption)
    [1, 1, 0, 0, 1, 0, 0, 0],  # noisy g0
    [1, 1, 1, 0, 0, 1, 0, 0],  # noisy g1 never sees clean g1
    [1, 1, 1, 1, 0, 0, 1, 0],  # caption: condition + whole clean image, no noisy tokens
    [1, 1, 1, 1, 0, 0, 1, 1],
]


def test_text_first_layout_by_hand():
    kind, group = layout(2, [2, 1, 2])
    assert torch.equal(generalized_causal_mask(kind, group)[0], torch.tensor(T2I, dtype=torch.bool))


def test_image_first_layout_by_hand():
    kind, group = layout(2, [1, 1], image_first=True, text_len=2)
    assert torch.equal(generalized_causal_mask(kind, group)[0], torch.tensor(CAPTION, dtype=torch.bool))


def test_a_bidirectional_prompt_sees_itself_whole_and_nothing_else_changes():
    """Caption order with a 3-token prompt: under `bidirectional_prompt` the prompt's tokens see each
    other (the first one the last); everything else is the causal layout's; without it, the prompt
    group changes nothing."""
    kind, group = layout(3, [1, 1], image_first=True, text_len=2)
    group[0, :3] = PROMPT
    causal = generalized_causal_mask(kind, group)[0]
    prompt = generalized_causal_mask(kind, group, bidirectional_prompt=True)[0]
    assert torch.equal(causal, generalized_causal_mask(*layout(3, [1, 1], image_first=True, text_len=2))[0])
    assert prompt[:3, :3].all() and not causal[0, 1]
    inside = torch.zeros_like(prompt)
    inside[:3, :3] = True
    assert torch.equal(prompt & ~inside, causal & ~inside)
    # the caption after the image stays causal: its first token does not see its second
    assert not prompt[-2, -1] and prompt[-1, :3].all()


def test_transfusion_text_reads_noisy_image():
    kind = torch.tensor([[TEXT, NOISY, NOISY, TEXT]])
    group = torch.tensor([[-1, 0, 0, -1]])
    m = generalized_causal_mask(kind, group, text_sees_noisy=True)[0]
    assert m[3].tolist() == [True, True, True, True]
    assert m[1].tolist() == [True, True, True, False]  # image bidirectional, never the later text
    assert generalized_causal_mask(kind, group)[0][3].tolist() == [True, False, False, True]


def test_discrete_image_tokens_are_causal_like_text():
    """Token-Shuffle sequences (T2I and caption order, from the builder): fused code tokens see the
    text and codes before them and never a later code, as the next-token loss needs."""
    from mmfusion.model.sequence import SequenceBuilder

    codes = torch.randint(0, 64, (4, 4))
    t2i = SequenceBuilder(0, code_width=4).text([1, 5, 3]).codes(codes, torch.arange(4), loss_weight=1.0).text([4])
    caption = SequenceBuilder(0, code_width=4).text([1, 3]).codes(codes, torch.arange(4)).text([4, 7, 2], loss=True)
    for row in (t2i.tensors(), caption.tensors()):
        kind = row["kind"][None]
        assert (kind == CODE).sum() == 4
        m = generalized_causal_mask(kind, row["group"][None])[0]
        assert torch.equal(m, torch.ones_like(m).tril())


def test_padding_is_invisible_and_sees_itself():
    kind = torch.tensor([[TEXT, CLEAN, NOISY, PAD, PAD]])
    group = torch.tensor([[-1, 0, 1, -1, -1]])
    m = generalized_causal_mask(kind, group)[0]
    assert not m[:3, 3:].any()
    assert m[3].tolist() == [False, False, False, True, False]
    assert m.any(-1).all()  # no empty row (SDPA would return NaN)


def test_rules_hold_for_random_layouts():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = int(torch.randint(1, 6, (1,), generator=g))
        sizes = torch.randint(1, 4, (s,), generator=g).tolist()
        cond = int(torch.randint(0, 4, (1,), generator=g))
        kind, group = layout(cond, sizes)
        m = generalized_causal_mask(kind, group)[0]
        k, gr = kind[0], group[0]
        for q in range(len(k)):
            for key in range(len(k)):
                if k[key] == TEXT:  # the condition is seen by all later tokens
                    assert m[q, key] == (key <= q)
                elif k[q] == NOISY and k[key] == CLEAN:  # never its own clean copy nor later groups
                    assert m[q, key] == (gr[key] < gr[q])
                elif k[q] == NOISY and k[key] == NOISY:
                    assert m[q, key] == (gr[key] == gr[q])
                elif k[q] == CLEAN and k[key] == CLEAN:  # clean j sees clean <= j
                    assert m[q, key] == (gr[key] <= gr[q])
                elif k[q] == CLEAN and k[key] == NOISY:
                    assert not m[q, key]
