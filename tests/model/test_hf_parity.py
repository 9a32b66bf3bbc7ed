"""Our backbone equals Hugging Face's LLaMA / Qwen2 / Qwen3 on text, weights copied by name."""

import re

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

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


# long-context frequency scaling; a short original context puts the 16 frequencies of a 32-wide head
# into all three llama3 bands (kept, blended, divided), so each branch is compared with Hugging Face's
LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "llama3-rope", "linear-rope"])
def test_text_logits_match_hugging_face(family):
    torch.manual_seed(0)
    if family == "qwen3":
        hf = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **KW))
    elif family == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**KW))
        for name, p in hf.named_parameters():  # Hugging Face starts biases at zero: make them count
            if name.endswith(".bias"):
                torch.nn.init.normal_(p, std=0.5)
    else:
        rope = {"llama3-rope": LLAMA3, "linear-rope": dict(rope_type="linear", factor=4.0)}.get(family)
        hf = LlamaForCausalLM(LlamaConfig(**KW, rope_scaling=rope))
    hf.eval()
    cfg = config_from_hf(hf.config, fp32_head=False)
    ours = MMFusionModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    assert not unexpected
    assert all(not m.startswith("backbone.") for m in missing), missing
    assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    if family.endswith("-rope"):
        assert cfg.rope_type == family.removesuffix("-rope")
    ids = torch.randint(0, 97, (2, 40))  # positions past the wavelengths where llama3 scaling sets in
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.text_logits(ours(text_batch(ids.tolist())))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_llama3_frequency_bands():
    """The scaled frequencies by band: short wavelengths kept, long ones divided, a blend between."""
    from mmfusion.model.layers import scaled_frequencies

    inv = 1.0 / (5000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    out = scaled_frequencies(inv, "llama3", 8.0, 1.0, 4.0, 64)
    ratio = 64 * inv / (2 * torch.pi)  # original context / wavelength
    kept, divided = ratio > 4.0, ratio < 1.0
    middle = ~kept & ~divided
    assert kept.any() and divided.any() and middle.any()
    torch.testing.assert_close(out[kept], inv[kept])
    torch.testing.assert_close(out[divided], inv[divided] / 8)
    assert ((out[middle] > inv[middle] / 8) & (out[middle] < inv[middle])).all()


def test_unsupported_rope_type_is_a_clear_error():
    from mmfusion.errors import UserError

    hf = LlamaConfig(**KW, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64))
    with pytest.raises(UserError, match="rope type 'yarn' is not supported; supported: default, linear, llama3"):
        config_from_hf(hf)


def test_incomplete_rope_settings_are_a_clear_error():
    from mmfusion.errors import UserError

    hf = LlamaConfig(**KW)
    hf.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5000.0}
    with pytest.raises(UserError, match="the checkpoint's llama3 rope settings lack 'low_freq_factor'"):
        config_from_hf(hf)


@pytest.mark.parametrize(
    "settings, problem",
    [
        (dict(attention_bias=True), "attention_bias (biases on q, k, v and o) is not supported"),
        (dict(mlp_bias=True), "mlp_bias is not supported"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ],
)
def test_settings_the_backbone_lacks_are_refused(settings, problem):
    from mmfusion.errors import UserError

    with pytest.raises(UserError, match=re.escape(problem)):
        config_from_hf(LlamaConfig(**KW, **settings))


def test_qwen_sliding_window_is_refused():
    from mmfusion.errors import UserError

    with pytest.raises(UserError, match="sliding-window attention"):
        config_from_hf(Qwen2Config(**KW, use_sliding_window=True))


def test_other_model_types_are_refused():
    from transformers import MistralConfig

    from mmfusion.errors import UserError

    with pytest.raises(UserError, match=r"model_type 'mistral' is not supported; supported: llama \(LLaMA\), qwen2"):
        config_from_hf(MistralConfig(**KW))
