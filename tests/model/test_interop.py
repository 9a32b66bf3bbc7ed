"""Initialise from a Hugging Face LLaMA / Qwen3 folder; load big models without a second copy."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

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


def _hf_folder(path, family):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**KW)) if family == "llama" else Qwen3ForCausalLM(Qwen3Config(head_dim=32, **KW))
    hf.save_pretrained(path, safe_serialization=True)
    # a LLaMA-3-style byte-level tokenizer.json with its own names for the special tokens
    vocab = {t: i for i, t in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(path / "tokenizer.json"))
    return hf.eval()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_init_from_llm_matches_hugging_face_on_text(tmp_path, family):
    from mmfusion.config import load_config
    from mmfusion.data.datamodule import MMFusionDataModule
    from mmfusion.training.from_llm import init_from_llm, with_llm_backbone
    from mmfusion.training.module import MMFusionModule

    hf = _hf_folder(tmp_path / "llm", family)
    run = load_config(None, [*TINY_RUN, f"train.out={tmp_path}", "model.image_head_hidden=48"])
    cfg = with_llm_backbone(run, str(tmp_path / "llm"))
    assert cfg.model.qk_norm == (family == "qwen3") and cfg.model.dim == 64
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
