"""Initialise from a Hugging Face LLaMA / Qwen2 / Qwen3 folder, strictly; load big models without a second copy."""

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mmfusion.model.config import ModelConfig
from tests.conftest import TINY_RUN

KW = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5000.0,
    tie_word_embeddings=False,
)


def _hf_folder(path, family, **settings):
    torch.manual_seed(0)
    if family == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**{**KW, **settings}))
        for name, p in hf.named_parameters():  # Hugging Face starts biases at zero: make them count
            if name.endswith(".bias"):
                torch.nn.init.normal_(p, std=0.5)
    elif family == "qwen3":
        hf = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **{**KW, **settings}))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**{**KW, **settings}))
    hf.save_pretrained(path, safe_serialization=True)
    # a LLaMA-3-style byte-level tokenizer.json with its own names for the special tokens
    vocab = {t: i for i, t in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(path / "tokenizer.json"))
    return hf.eval()


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_init_from_llm_matches_hugging_face_on_text(tmp_path, family):
    from mmfusion.config import load_config
    from mmfusion.data.datamodule import MMFusionDataModule
    from mmfusion.training.from_llm import init_from_llm, with_llm_backbone
    from mmfusion.training.module import MMFusionModule

    hf = _hf_folder(tmp_path / "llm", family)
    run = load_config(None, [*TINY_RUN, f"train.out={tmp_path}", "model.image_head_hidden=48"])
    cfg = with_llm_backbone(run, str(tmp_path / "llm"))
    assert cfg.model.qk_norm == (family == "qwen3") and cfg.model.dim == 64
    assert cfg.model.qkv_bias == (family == "qwen2")
    # the image side is the run's, whatever the checkpoint (every field, not a list of names)
    assert cfg.model.image_head_hidden == 48 and cfg.model.image_grid == run.model.image_grid
    tok = MMFusionDataModule(cfg.data, 32, tmp_path).text_tokenizer()
    assert tok.special["bos"] == "<|begin_of_text|>" and len(tok) > 258  # boi / eoi / pad were added
    module = MMFusionModule(cfg, tok)
    init_from_llm(module, str(tmp_path / "llm"))
    ids = torch.randint(0, 258, (2, 9))
    from tests.helpers import text_batch

    with torch.no_grad():
        ref = hf(ids).logits[..., :258]
        for model in (module.model, module.ema):
            got = model.text_logits(model(text_batch(ids.tolist())))[..., :258]
            torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)


def _backbone_for(folder, **changes):
    from mmfusion.model.hf import config_from_hf, read_hf_config
    from mmfusion.model.multimodal import MMFusionModel

    return MMFusionModel(config_from_hf(read_hf_config(folder), fp32_head=False).replace(**changes)).eval()


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("model_ties", [True, False])
def test_a_tied_checkpoint_fills_embedding_and_head(tmp_path, model_ties):
    """Qwen2 / Llama 3.2 small models store one matrix for both; a model with its own head gets a copy."""
    from mmfusion.model.hf import load_hf_backbone
    from tests.helpers import text_batch

    hf = _hf_folder(tmp_path, "qwen2", tie_word_embeddings=True)
    ours = _backbone_for(tmp_path, tie_embeddings=model_ties)
    loaded = load_hf_backbone(ours, tmp_path)
    assert ("lm_head.weight" in loaded) != model_ties and "embed_tokens.weight" in loaded
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            ours.text_logits(ours(text_batch(ids.tolist()))), hf(ids).logits, atol=3e-5, rtol=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_a_checkpoint_tensor_without_a_place_is_named(tmp_path, family):
    from mmfusion.errors import UserError
    from mmfusion.model.hf import load_hf_backbone

    _hf_folder(tmp_path, family)
    _edit_weights(tmp_path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(4, 64)}))
    name = {"llama": "LLaMA", "qwen3": "Qwen3", "qwen2": "Qwen2"}[family]
    with pytest.raises(UserError, match=f"^model.layers.0.mlp.extra.weight: not a tensor of a {name} backbone; "):
        load_hf_backbone(_backbone_for(tmp_path), tmp_path)


def test_the_error_lists_what_mmfusion_maps(tmp_path):
    """A Qwen2 checkpoint met by a backbone without q / k / v biases (what mmfusion did before it had
    them: load, the biases silently dropped) is now an error naming them."""
    from mmfusion.errors import UserError
    from mmfusion.model.hf import load_hf_backbone

    _hf_folder(tmp_path, "qwen2")
    with pytest.raises(UserError) as err:
        load_hf_backbone(_backbone_for(tmp_path, qkv_bias=False), tmp_path)
    message = str(err.value)
    assert message.startswith("model.layers.0.self_attn.k_proj.bias, model.layers.0.self_attn.q_proj.bias, ")
    assert (
        "and 3 more: not a tensor of a Qwen2 backbone; mmfusion maps (N = 0 to 1): model.embed_tokens.weight, "
        in message
    )
    assert "model.layers.N.self_attn.q_proj.weight" in message and "bias" not in message.split("maps (N = 0 to 1):")[1]
    assert "\n" not in message


@pytest.mark.parametrize(
    "family, dropped",
    [("llama", "model.layers.1.self_attn.k_proj.weight"), ("qwen2", "model.layers.0.self_attn.q_proj.bias")],
)
def test_a_missing_backbone_tensor_is_named(tmp_path, family, dropped):
    from mmfusion.errors import UserError
    from mmfusion.model.hf import load_hf_backbone

    _hf_folder(tmp_path, family)
    _edit_weights(tmp_path, lambda s: s.pop(dropped))
    with pytest.raises(UserError, match=f"the checkpoint lacks 1 tensor\\(s\\) of a .* backbone: {dropped}$"):
        load_hf_backbone(_backbone_for(tmp_path), tmp_path)


def test_stored_rotary_frequencies_are_passed_over(tmp_path):
    """Older LLaMA checkpoints keep each layer's inv_freq buffer: computed from the config here."""
    from mmfusion.model.hf import load_hf_backbone

    _hf_folder(tmp_path, "llama")
    _edit_weights(tmp_path, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    assert len(load_hf_backbone(_backbone_for(tmp_path), tmp_path)) == 2 * 9 + 3


def test_an_untied_checkpoint_needs_its_head(tmp_path):
    from mmfusion.errors import UserError
    from mmfusion.model.hf import load_hf_backbone

    _hf_folder(tmp_path, "llama")
    with pytest.raises(UserError, match="^lm_head.weight: the checkpoint's text head is untied, the model ties it"):
        load_hf_backbone(_backbone_for(tmp_path, tie_embeddings=True), tmp_path)
    _edit_weights(tmp_path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(UserError, match="lacks 1 tensor\\(s\\) of a LLaMA backbone: lm_head.weight$"):
        load_hf_backbone(_backbone_for(tmp_path), tmp_path)


def test_other_model_types_are_refused(tmp_path):
    """A GPT-2 folder (another layout, LayerNorm, learned positions) is refused before anything is built."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmfusion.config import load_config
    from mmfusion.errors import UserError
    from mmfusion.model.hf import load_hf_backbone
    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.training.from_llm import with_llm_backbone

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    message = "model_type 'gpt2' is not supported; supported: llama (LLaMA), qwen2 (Qwen2), qwen3 (Qwen3)$"
    with pytest.raises(UserError, match=f"^--init-from-llm {tmp_path}: {re.escape(message[:-1])}$"):
        with_llm_backbone(load_config(None, TINY_RUN), str(tmp_path))
    with pytest.raises(UserError, match=re.escape(message[:-1])):
        load_hf_backbone(MMFusionModel(ModelConfig.from_name("tiny")), tmp_path)


def test_train_cli_with_init_from_llm(tmp_path):
    from mmfusion.cli.main import main

    _hf_folder(tmp_path / "llm", "llama")
    assert (
        main(
            [
                "train",
                *TINY_RUN,
                "train.max_steps=2",
                f"train.out={tmp_path / 'run'}",
                "--init-from-llm",
                str(tmp_path / "llm"),
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg["model"]["dim"] == 64 and cfg["special_tokens"]["bos"] == "<|begin_of_text|>"


def test_from_pretrained_builds_on_meta_device(trained_tiny, monkeypatch):
    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.pipeline import MMFusion

    devices = []
    real_init = MMFusionModel.__init__

    def spy(self, cfg):
        real_init(self, cfg)
        devices.append(self.embed_tokens.weight.device.type)

    monkeypatch.setattr(MMFusionModel, "__init__", spy)
    pipe = MMFusion.from_pretrained(trained_tiny)
    assert devices == ["meta"]
    assert all(p.device.type == "cpu" for p in pipe.model.parameters())
    assert pipe.generate(["a red circle"], steps=2)[0].size == (32, 32)
