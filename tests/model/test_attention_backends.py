"""Every attention backend (explicit math, FlexAttention with a block mask, the "auto" choice)
gives the outputs of dense masked SDPA on the generalized causal mask."""

import pytest
import torch
import torch.nn.functional as F

from mmfusion.model.attention_backends import (
    MATH_MAX_KEYS,
    flex_attention_masked,
    flex_available,
    masked_attention,
    math_attention,
)
from mmfusion.model.masks import generalized_causal_mask, layout
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import collate
from tests.helpers import fusion_sample

needs_flex = pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")


def _qkv_mask(requires_grad: bool = False, short: bool = False):
    sizes = [4, 3, 6, 3] if short else [40, 30, 60, 30]
    kind, group = layout(20, sizes, image_first=True, text_len=20)
    mask = generalized_causal_mask(kind, group)
    q, k, v = (torch.randn(1, 2, kind.shape[1], 32, requires_grad=requires_grad) for _ in range(3))
    return q, k, v, mask


def test_math_equals_sdpa_outputs_and_gradients():
    q, k, v, mask = _qkv_mask(requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = math_attention(q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_auto_takes_math_only_for_short_bf16_training_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr("mmfusion.model.attention_backends.math_attention", lambda *a: calls.append(1) or a[0])
    q, k, v, mask = _qkv_mask(short=True)
    assert k.shape[2] <= MATH_MAX_KEYS
    masked_attention(q, k, v, mask)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            masked_attention(q, k, v, mask)  # no gradients: SDPA's forward is as fast
        masked_attention(q, k, v, mask)
        long = torch.randn(1, 2, MATH_MAX_KEYS + 1, 32)
        masked_attention(long, long, long, torch.ones(1, MATH_MAX_KEYS + 1, MATH_MAX_KEYS + 1, dtype=torch.bool))
    assert len(calls) == 1


def test_auto_under_bf16_autocast_matches_fp32(tiny_cfg):
    """The "auto" backend in bf16 training stays within bf16 rounding of the fp32 SDPA model."""
    ref = MMFusionModel(tiny_cfg.replace(attention="sdpa"))
    auto = MMFusionModel(tiny_cfg)
    auto.load_state_dict(ref.state_dict())
    batch = collate([fusion_sample(tiny_cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 10, 2])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = auto(batch)
    scale = ref(batch).abs().max()
    assert (out.float() - ref(batch)).abs().max() < 0.05 * scale


@needs_flex
def test_flex_equals_sdpa_on_generalized_mask():
    q, k, v, mask = _qkv_mask()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(flex_attention_masked(q, k, v, mask), ref, atol=1e-5, rtol=1e-4)


@needs_flex
def test_model_with_flex_backend_matches_sdpa(tiny_cfg):
    sdpa = MMFusionModel(tiny_cfg.replace(attention="sdpa")).eval()
    flex = MMFusionModel(tiny_cfg.replace(attention="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    batch = collate(
        [
            fusion_sample(tiny_cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 10, 2]),
            fusion_sample(tiny_cfg, [1, 7], [9], seed=1),
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(flex(batch), sdpa(batch), atol=1e-5, rtol=1e-4)
    # training on CPU falls back to SDPA (FlexAttention has no CPU backward)
    flex.train()
    flex(batch).sum().backward()
    assert flex.backbone.layers[0].self_attn.q_proj.weight.grad is not None
