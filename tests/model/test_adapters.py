"""Several LoRA adapters at once with weights, switched, disabled, fused, and refused by another base."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import ConfigError, UserError
from mmfusion.model.adapters import base_fingerprint, write_record
from mmfusion.pipeline import MMFusion
from mmfusion.training.lora import MLP, add_lora
from mmfusion.training.objective import JointObjective

FIXTURE = Path(__file__).parent.parent / "fixtures" / "model_2026_12_05"
TARGETS = {"a": ("q_proj", "v_proj"), "b": ("v_proj", "o_proj", *MLP)}


def _make_adapter(base: torch.nn.Module, folder: Path, targets, seed: int, record: bool = True) -> None:
    torch.manual_seed(seed)
    model = add_lora(copy.deepcopy(base), r=4, alpha=8, targets=targets)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.05)
    model.save_pretrained(str(folder))
    if record:
        write_record(folder, base_fingerprint(base), "fixture")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = MMFusion.from_pretrained(FIXTURE, device="cpu").model
    for i, (name, targets) in enumerate(TARGETS.items()):
        _make_adapter(base, root / name, targets, seed=i)
    return root


def _pipe() -> MMFusion:
    return MMFusion.from_pretrained(FIXTURE, device="cpu")


def _out(pipe: MMFusion) -> torch.Tensor:
    cfg = pipe.model.cfg
    obj = JointObjective(cfg, DiffusionConfig(), ObjectiveConfig(t2i_fraction=0.5, caption_dropout=0.0), 1, 2, 3, 4)
    tokens = torch.randn(2, cfg.num_image_tokens, cfg.image_token_dim, generator=torch.Generator().manual_seed(1))
    batch = obj.build(tokens, [[10, 11, 12], [13, 14]], None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.model(batch)


def _by_hand(base: dict, folder: Path, weight: float, into: dict) -> None:
    """into[n] += weight * (alpha / r) * B @ A for each LoRA pair saved in `folder`."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    saved = load_file(str(folder / "adapter_model.safetensors"))
    for key, a in saved.items():
        if ".lora_A." in key:
            b = saved[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            into[name] = into.get(name, base[name]) + weight * cfg["lora_alpha"] / cfg["r"] * (b @ a)


def test_weighted_adapters_equal_the_hand_computed_weights_and_fuse_save_reload(adapters, tmp_path):
    base = _pipe()
    want = {}
    _by_hand(base.model.state_dict(), adapters / "a", 0.7, want)
    _by_hand(base.model.state_dict(), adapters / "b", 0.3, want)
    pipe = _pipe().load_adapter(adapters / "a", weight=0.7).load_adapter(adapters / "b", weight=0.3)
    assert pipe.adapter_weights == {"a": 0.7, "b": 0.3}
    unfused = _out(pipe)
    with pytest.raises(UserError, match="fuse_adapters"):
        pipe.save_pretrained(tmp_path / "nope")
    pipe.fuse_adapters()
    fused = pipe.model.state_dict()
    assert set(fused) == set(base.model.state_dict())  # no peft wrappers left
    for n, w in base.model.state_dict().items():
        torch.testing.assert_close(fused[n], want.get(n, w), atol=1e-6, rtol=1e-5, msg=n)
    assert any(n.endswith("v_proj.weight") for n in want)  # v_proj took both adapters' deltas
    torch.testing.assert_close(_out(pipe), unfused, atol=1e-5, rtol=1e-5)
    reloaded = MMFusion.from_pretrained(pipe.save_pretrained(tmp_path / "fused"), device="cpu")
    assert torch.equal(_out(reloaded), _out(pipe))
    for spec in (["a:0.7", "b:0.3"], [(adapters / "a", 0.7), (adapters / "b", 0.3)]):
        specs = [f"{adapters}/{s}" if isinstance(s, str) else s for s in spec]
        loaded = MMFusion.from_pretrained(FIXTURE, device="cpu", adapters=specs).model.state_dict()
        assert all(torch.equal(loaded[n], fused[n]) for n in fused)


def test_switch_disable_and_delete_without_reloading_the_base(adapters):
    base_out = _out(_pipe())
    only_a = _out(_pipe().load_adapter(adapters / "a"))
    pipe = _pipe().load_adapter(adapters / "a", name="A").load_adapter(adapters / "b", name="B")
    pipe.set_adapters("B")
    only_b = _out(pipe)
    assert not torch.equal(only_b, only_a)
    pipe.set_adapters({"A": 1.0})
    assert torch.equal(_out(pipe), only_a)
    pipe.set_adapters(["A", "B"], weights=[0.0, 0.0])
    torch.testing.assert_close(_out(pipe), base_out)
    pipe.set_adapters("A").disable_adapters()
    assert torch.equal(_out(pipe), base_out) and pipe.adapter_weights == {}
    pipe.enable_adapters()
    assert torch.equal(_out(pipe), only_a)
    with pytest.raises(UserError, match="no adapter named 'C'"):
        pipe.set_adapters({"C": 1.0})
    pipe.delete_adapter("A").set_adapters("B")
    assert torch.equal(_out(pipe), only_b)
    pipe.delete_adapter("B")
    assert torch.equal(_out(pipe), base_out)


def test_an_adapter_of_another_base_is_refused_and_an_old_one_warns(adapters, tmp_path):
    other = copy.deepcopy(_pipe().model)
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    _make_adapter(other, tmp_path / "other", ("q_proj",), seed=3)
    with pytest.raises(UserError, match="trained on another base model"):
        _pipe().load_adapter(tmp_path / "other")
    _make_adapter(_pipe().model, tmp_path / "old", ("q_proj",), seed=4, record=False)
    with pytest.warns(UserWarning, match="does not record the base model"):
        _pipe().load_adapter(tmp_path / "old")
    with pytest.raises(UserError, match="the weight after ':' must be a number"):
        MMFusion.from_pretrained(FIXTURE, device="cpu", adapters=[f"{adapters}/a:x"])


def test_cli_adapter_with_a_weight(adapters, tmp_path, capsys):
    from mmfusion.cli.main import main

    gen = tmp_path / "gen"
    args = ["generate", "--model", str(FIXTURE), "--prompt", "a red circle", "--out", str(gen), "--steps", "2"]
    assert main([*args, "--adapter", f"{adapters}/a:0.5", "--adapter", f"{adapters}/b"]) == 0
    assert (gen / "0000.png").exists()
    capsys.readouterr()
    assert main([*args, "--adapter", f"{adapters}/a:x"]) != 0
    err = capsys.readouterr().err.strip()
    assert "the weight after ':' must be a number" in err and len(err.splitlines()) == 1


def test_the_text_vocabulary_grows_from_its_pieces_and_shrinks_back(tiny_cfg):
    """`resize_vocab`: new rows of the embedding and of the text head start at the mean of the rows they
    were spelt with, the old rows are untouched; an int shrinks back to exactly the old model."""
    import dataclasses

    from mmfusion.model.multimodal import MMFusionModel

    model = MMFusionModel(tiny_cfg)
    before = copy.deepcopy(model.state_dict())
    n = tiny_cfg.vocab_size
    model.resize_vocab([[3, 7, 9], [11]])
    assert model.cfg.vocab_size == n + 2 and model.embed_tokens.weight.shape == (n + 2, tiny_cfg.dim)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        w = model.state_dict()[name]
        assert torch.equal(w[:n], before[name])
        torch.testing.assert_close(w[n], before[name][[3, 7, 9]].mean(0))
        torch.testing.assert_close(w[n + 1], before[name][11])
    assert model.text_logits(torch.zeros(1, tiny_cfg.dim)).shape == (1, n + 2)
    model.resize_vocab(n)
    assert model.cfg == tiny_cfg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="class-conditional"):
        MMFusionModel(dataclasses.replace(tiny_cfg, num_classes=4)).resize_vocab([[1]])


def test_the_sampling_an_adapter_records_follows_it_and_stays_when_fused(adapters, tmp_path):
    """An adapter's recorded sampling changes (its fine-tuning's guidance scale) are the model's while it is the
    one active adapter at weight 1, the base's otherwise, and a fused model keeps and saves them."""
    base = _pipe()
    scale = base.sampling.diffusion.cfg_scale
    tuned = tmp_path / "tuned"
    _make_adapter(base.model, tuned, TARGETS["a"], seed=5, record=False)
    write_record(tuned, base_fingerprint(base.model), "fixture", sample={"diffusion": {"cfg_scale": scale + 1.5}})
    pipe = _pipe().load_adapter(tuned, name="T")
    assert pipe.sampling.diffusion.cfg_scale == scale + 1.5
    assert pipe.sampling.caption == base.sampling.caption and pipe.sampling.tokens == base.sampling.tokens
    pipe.disable_adapters()
    assert pipe.sampling == base.sampling
    pipe.enable_adapters().set_adapters({"T": 0.5})
    assert pipe.sampling == base.sampling  # half the fine-tuning is not the model it measured
    pipe.load_adapter(adapters / "b", name="B").set_adapters({"T": 1.0, "B": 1.0})
    assert pipe.sampling == base.sampling
    pipe.set_adapters("B")
    assert pipe.sampling == base.sampling  # B records no sampling
    pipe.set_adapters("T")
    assert pipe.sampling.diffusion.cfg_scale == scale + 1.5
    pipe.delete_adapter("B").delete_adapter("T")
    assert pipe.sampling == base.sampling
    fused = _pipe().load_adapter(tuned).fuse_adapters()
    assert fused.sampling.diffusion.cfg_scale == scale + 1.5
    fused.save_pretrained(tmp_path / "merged")
    assert MMFusion.from_pretrained(tmp_path / "merged").sampling.diffusion.cfg_scale == scale + 1.5
    assert MMFusion.from_pretrained(FIXTURE, adapters=[tuned]).sampling == fused.sampling
    assert _pipe().load_adapter(tuned).disable_adapters().fuse_adapters().sampling == base.sampling
    with pytest.raises(UserError, match="no adapter named"):
        _pipe().load_adapter(tuned).set_adapters({"nothing": 1.0})
    bad = tmp_path / "bad"
    _make_adapter(base.model, bad, TARGETS["a"], seed=6, record=False)
    write_record(bad, base_fingerprint(base.model), "fixture", sample={"diffusion": {"cfg_scal": 2.0}})
    failed = _pipe()
    with pytest.raises(ConfigError, match="cfg_scal"):
        failed.load_adapter(bad)
    assert failed.sampling == base.sampling
