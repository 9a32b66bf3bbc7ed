"""Our backbone equals Hugging Face's LLaMA / Qwen3 on text, weights copied by name."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from mmfusion.model.hf import config_from_hf, state_dict_from_hf
from mmfusion.model.multimodal import MMFusionModel
from tests.helpers import text_batch

KW = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5000.0,
    attn_implementation="eager",
)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_text_logits_match_hugging_face(family):
    torch.manual_seed(0)
    hf = (
        LlamaForCausalLM(LlamaConfig(**KW)) if family == "llama" else Qwen3ForCausalLM(Qwen3Config(head_dim=32, **KW))
    ).eval()
    cfg = config_from_hf(hf.config, fp32_head=False)
    ours = MMFusionModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    assert not unexpected
    assert all(not m.startswith("backbone.") for m in missing), missing
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.text_logits(ours(text_batch(ids.tolist())))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
