import copy
import json

import pytest
import torch
from peft import PeftModel

from mmfusion.config import ObjectiveConfig
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import UserError
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.training.finetune import FINETUNED_CFG_SCALE
from mmfusion.training.lora import (
    ATTENTION,
    IMAGE,
    MLP,
    add_lora,
    initial_factors,
    parameter_counts,
    save_as_plain_lora,
    weight_space_training,
)
from mmfusion.training.objective import JointObjective

CAPTIONS = [[10, 11, 12], [13, 14], [15, 16, 17, 18]]


def _batch(cfg, t2i: float):
    obj = JointObjective(cfg, DiffusionConfig(), ObjectiveConfig(t2i_fraction=t2i, caption_dropout=0.0), 1, 2, 3, 4)
    tokens = torch.randn(3, cfg.num_image_tokens, cfg.image_token_dim)
    return obj, obj.build(tokens, CAPTIONS, None, torch.Generator().manual_seed(0))


def _perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.05)


@pytest.mark.parametrize("t2i", [1.0, 0.0], ids=["image-path", "text-only"])
def test_gradients_reach_adapters_only(tiny_cfg, t2i):
    net = MMFusionModel(tiny_cfg)
    torch.nn.init.normal_(net.image_head.weight, std=0.02)  # as after training (it starts at zero)
    model = add_lora(net, r=4, alpha=8, targets=("q_proj", "v_proj", *MLP))
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total / 5
    _perturb(model)
    obj, batch = _batch(tiny_cfg, t2i)
    losses = obj.loss(model, batch)
    (losses["image_loss"] if t2i else losses["text_loss"]).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_save_load_gives_identical_outputs(tiny_cfg, tmp_path):
    base = MMFusionModel(tiny_cfg).eval()
    model = add_lora(copy.deepcopy(base), r=4, alpha=8)
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or files == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    _, batch = _batch(tiny_cfg, 0.5)
    with torch.no_grad():
        assert torch.equal(model.eval()(batch), loaded(batch))


def test_merged_equals_unmerged(tiny_cfg):
    model = add_lora(MMFusionModel(tiny_cfg), r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", *MLP))
    _perturb(model)
    _, batch = _batch(tiny_cfg, 0.5)
    with torch.no_grad():
        unmerged = model.eval()(batch)
        merged = model.merge_and_unload().eval()(batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden", [0, 32])
def test_image_projections_can_be_adapted_and_train(hidden):
    """`--target ...,image_in,image_head_mlp.0,image_head`: the image loss reaches the adapters of the
    image input and output projections (the head MLP's first layer where there is one; a name the
    model lacks adapts nothing), and merging changes no prediction."""
    cfg = ModelConfig.from_name("tiny", image_head_hidden=hidden)
    net = MMFusionModel(cfg)
    torch.nn.init.normal_(net.image_head.weight, std=0.02)
    model = add_lora(net, r=4, alpha=8, targets=ATTENTION + MLP + IMAGE)
    _perturb(model)
    obj, batch = _batch(cfg, 1.0)
    obj.loss(model, batch)["image_loss"].backward()
    params = dict(model.named_parameters())
    for name in ("image_in", *(("image_head_mlp.0",) if hidden else ()), "image_head"):
        lora_a = params[f"base_model.model.{name}.lora_A.default.weight"]
        assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0, name
    assert hidden or not any("image_head_mlp" in n for n in params)
    with torch.no_grad():
        unmerged = model.eval().image_output(model(batch))
        merged = model.merge_and_unload().eval()
        torch.testing.assert_close(merged.image_output(merged(batch)), unmerged, atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, obj, batch):
    model.zero_grad(set_to_none=True)
    loss = obj.loss(model, batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("t2i", [1.0, 0.5], ids=["image-path", "joint"])
def test_weight_space_training_equals_peft_in_loss_and_gradients(t2i):
    """Training's one-product form, x (W + s B A)^T, gives peft's loss and the same gradient for every
    trainable tensor (LoRA factors, the image projections' adapters, token rows), and leaving it restores
    peft's own forward."""
    cfg = ModelConfig.from_name("tiny", image_head_hidden=32)
    net = MMFusionModel(cfg)
    torch.nn.init.normal_(net.image_head.weight, std=0.02)
    model = add_lora(net, r=4, alpha=8, targets=ATTENTION + MLP + IMAGE, token_rows=[10, 13, 15])
    _perturb(model)
    obj, batch = _batch(cfg, t2i)
    loss, grads = _loss_and_grads(model, obj, batch)
    with weight_space_training(model) as n:
        assert n == cfg.n_layers * len(ATTENTION + MLP) + len(IMAGE)
        fast_loss, fast_grads = _loss_and_grads(model, obj, batch)
    torch.testing.assert_close(fast_loss, loss, atol=1e-6, rtol=1e-5)
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert fast_grads.keys() == grads.keys() >= set(lora) and (t2i == 1 or len(grads) > len(lora))
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_loss_and_grads(model, obj, batch)[0], loss)


def test_weight_space_training_leaves_layers_it_cannot_express_to_peft(tiny_cfg):
    """Dropout on the adapter's input (and any other variant) keeps peft's forward."""
    net = MMFusionModel(tiny_cfg)
    with weight_space_training(add_lora(net, r=4, alpha=8, targets=ATTENTION, dropout=0.1)) as n:
        assert n == 0
    with weight_space_training(MMFusionModel(tiny_cfg)) as n:  # full fine-tuning: nothing to do
        assert n == 0


def _backward(model, batch, obj):
    return lambda: obj.loss(model, batch)["loss"].backward()


@pytest.mark.parametrize("init", ["lora_ga", "pissa", "olora"])
def test_other_inits_start_at_the_base_and_save_as_plain_lora(tiny_cfg, tmp_path, init):
    """LoRA-GA, PiSSA and OLoRA move the frozen weights but not the function: the adapted model's output at
    the start equals the base's. Trained and saved as the plain LoRA of rank 2r, the adapter gives the
    trained model on the untouched base (token rows kept as trained); plain LoRA has no factors to keep."""
    base = MMFusionModel(tiny_cfg).eval()
    torch.nn.init.normal_(base.image_head.weight, std=0.02)
    obj, batch = _batch(tiny_cfg, 0.5)
    net = copy.deepcopy(base)
    step = _backward(net, batch, obj)
    model = add_lora(net, r=4, alpha=8, targets=ATTENTION + MLP, token_rows=[10, 13], init=init, gradient_step=step)
    assert initial_factors(add_lora(copy.deepcopy(base), r=4, alpha=8)) is None
    initial = initial_factors(model)
    assert initial and all(v.abs().sum() > 0 for v in initial.values())  # B starts non-zero, unlike LoRA's
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch), base(batch), atol=1e-4, rtol=1e-4)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # as training would move them
        trained = model(batch)
    model.save_pretrained(str(tmp_path))
    save_as_plain_lora(tmp_path, initial)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), trained, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(trained, base(batch), atol=1e-3)


def test_lora_ga_starts_in_the_gradients_main_directions(tiny_cfg):
    """LoRA-GA's A spans the top right singular vectors of the training loss's gradient of each weight,
    as computed here directly on the base; plain LoRA's random A does not."""
    base = MMFusionModel(tiny_cfg).train()
    torch.nn.init.normal_(base.image_head.weight, std=0.02)
    obj, batch = _batch(tiny_cfg, 0.5)
    reference = copy.deepcopy(base)
    obj.loss(reference, batch)["loss"].backward()
    net, targets = copy.deepcopy(base), ("q_proj", "up_proj")
    ga = add_lora(net, r=4, alpha=8, targets=targets, init="lora_ga", gradient_step=_backward(net, batch, obj))
    plain = add_lora(copy.deepcopy(base), r=4, alpha=8, targets=targets)
    for name in ("backbone.layers.0.self_attn.q_proj", "backbone.layers.1.mlp.up_proj"):
        grad = reference.get_submodule(name).weight.grad
        top = torch.linalg.svd(grad, full_matrices=False).Vh[:4]  # (r, in)
        for model, low, high in ((ga, 3.9, 4.0), (plain, 0.0, 2.0)):
            a = model.base_model.model.get_submodule(name).lora_A["default"].weight.detach()
            basis = torch.linalg.qr(a.T).Q  # an orthonormal basis of A's row space, (in, r)
            overlap = (top @ basis).square().sum()  # r when the two spaces agree
            assert low <= overlap <= high + 1e-4, (name, float(overlap))


def test_lora_ga_needs_batches(tiny_cfg):
    with pytest.raises(UserError, match="LoRA-GA needs training batches"):
        add_lora(MMFusionModel(tiny_cfg), init="lora_ga")


def test_unknown_target_is_refused(tiny_cfg):
    with pytest.raises(UserError, match="unknown LoRA target"):
        add_lora(MMFusionModel(tiny_cfg), targets=("qkv",))
    with pytest.raises(UserError, match="unknown LoRA init"):
        add_lora(MMFusionModel(tiny_cfg), init="gaussian")


@pytest.mark.parametrize(("task", "compiled"), [("caption", True), ("t2i", False)])
def test_finetune_cli_end_to_end(trained_tiny, tmp_path, task, compiled, capsys):
    """The caption task at the default (the transformer compiled with its adapters), t2i eager with LoRA+
    and LoRA-GA's start (its adapter saved as the plain LoRA that gives the trained model on the base)."""
    from mmfusion.cli.main import main
    from mmfusion.pipeline import MMFusion

    out = tmp_path / "adapter"
    data = str(trained_tiny.parent / "data")
    assert (
        main(
            [
                "finetune",
                "--model",
                str(trained_tiny),
                "--data",
                data,
                "--task",
                task,
                "--lora-r",
                "4",
                "--lora-alpha",
                "8",
                "--target",
                "q_proj,v_proj,up_proj",
                "--out",
                str(out),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--merge",
                "--precision",
                "32-true",
                "--lr",
                "0.05",
                *([] if compiled else ["--no-compile", "--loraplus-lr-ratio", "8", "--lora-init", "lora_ga"]),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "trainable parameters:" in printed
    assert f"it samples at guidance {FINETUNED_CFG_SCALE:g} unless told otherwise" in printed
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "mmfusion_adapter.json").read_text())["base_model"] == str(trained_tiny)
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["trainable_parameters"] < report["total_parameters"] / 5 and report["steps"] == 3
    assert report["compile"] is compiled and report["batch_size"] == 4
    assert report["loraplus_lr_ratio"] == (1.0 if compiled else 8.0)
    assert report["lora_init"] == ("lora" if compiled else "lora_ga")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == (4 if compiled else 8)
    base = MMFusion.from_pretrained(trained_tiny)
    adapted = MMFusion.from_pretrained(trained_tiny, adapters=[out])
    merged = MMFusion.from_pretrained(out / "merged")
    assert merged.training_data == "shapes, then fine-tuned on data"  # named so in its model card
    # the guidance scale the fine-tuned model samples with: recorded, and in use wherever the adapter is
    scale = FINETUNED_CFG_SCALE
    assert scale != base.sampling.diffusion.cfg_scale and report["cfg_scale"] == scale
    assert json.loads((out / "mmfusion_adapter.json").read_text())["sample"] == {"diffusion": {"cfg_scale": scale}}
    assert adapted.sampling == merged.sampling == base.sampling.changed({"diffusion": {"cfg_scale": scale}})
    for (n, a), (_, b) in zip(adapted.model.state_dict().items(), merged.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    changed = [
        n
        for (n, a), (_, b) in zip(base.model.state_dict().items(), adapted.model.state_dict().items())
        if not torch.equal(a, b)
    ]
    rows = {"embed_tokens.weight", "lm_head.weight"}  # the caption task also trains the rows its captions use
    assert set(changed) & rows == (set() if task == "t2i" else rows)
    assert changed and all(any(t in n for t in ("q_proj", "v_proj", "up_proj")) for n in set(changed) - rows)
    assert report["new_tokens"] == ("off" if task == "t2i" else "words")  # the tiny base spells words in pieces
    gen = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained_tiny),
                "--adapter",
                str(out),
                "--prompt",
                "a red circle",
                "--out",
                str(gen),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert (gen / "0000.png").exists()
    assert main(["caption", "--model", str(trained_tiny), "--adapter", str(out), str(gen / "0000.png")]) == 0


def test_two_saved_adapters_merge_into_the_sum_of_their_deltas(tiny_cfg, tmp_path):
    from mmfusion.model.adapters import merge_adapters

    base = MMFusionModel(tiny_cfg).eval()
    deltas = []
    for i, targets in enumerate((("q_proj", "v_proj"), ("v_proj", "o_proj", *MLP))):
        torch.manual_seed(i)
        model = add_lora(copy.deepcopy(base), r=4, alpha=8, targets=targets)
        _perturb(model)
        model.save_pretrained(str(tmp_path / f"a{i}"))
        merged = model.merge_and_unload()
        deltas.append({n: p - base.state_dict()[n] for n, p in merged.state_dict().items()})
    with pytest.warns(UserWarning, match="does not record the base model"):  # saved without mmfusion's record
        both = merge_adapters(copy.deepcopy(base), [tmp_path / "a0", tmp_path / "a1"]).state_dict()
    assert set(both) == set(base.state_dict())  # merged: no peft wrappers left
    moved = 0
    for n, p in base.state_dict().items():
        torch.testing.assert_close(both[n], p + deltas[0][n] + deltas[1][n], atol=1e-6, rtol=1e-5, msg=n)
        moved += int(bool(deltas[0][n].any() and deltas[1][n].any()))
    assert moved > 0  # some weights (v_proj) took both adapters' deltas
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        merge_adapters(copy.deepcopy(base), [tmp_path])
