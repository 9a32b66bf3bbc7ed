"""FlexAttention with a block mask gives the same outputs as dense masked SDPA."""

import pytest
import torch
import torch.nn.functional as F

from mmfusion.model.attention_backends import flex_attention_masked, flex_available
from mmfusion.model.masks import generalized_causal_mask, layout
from mmfusion.model.multimodal import MMFusionModel
from tests.helpers import fusion_sample

pytestmark = pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")


def test_flex_equals_sdpa_on_generalized_mask():
    kind, group = layout(20, [40, 30, 60, 30], image_first=True, text_len=20)
    mask = generalized_causal_mask(kind, group)
    q, k, v = (torch.randn(1, 2, kind.shape[1], 32) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(flex_attention_masked(q, k, v, mask), ref, atol=1e-5, rtol=1e-4)


def test_model_with_flex_backend_matches_sdpa(tiny_cfg):
    from mmfusion.model.sequence import collate

    sdpa = MMFusionModel(tiny_cfg).eval()
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
