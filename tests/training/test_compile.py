"""`train.compile`: compiled transformer blocks train exactly like eager ones."""

import copy

import pytest
import torch

from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import collate
from mmfusion.training.module import compile_blocks
from tests.helpers import fusion_sample


def _loss(model: MMFusionModel, batch) -> torch.Tensor:  # noqa: ANN001
    hidden = model(batch)
    return model.image_output(hidden).pow(2).mean() + model.text_logits(hidden).logsumexp(-1).mean()


@pytest.mark.parametrize(("per_block", "checkpointing"), [(False, False), (True, False), (False, True)])
def test_compiled_blocks_match_eager_loss_and_gradients(tiny_cfg, per_block, checkpointing):
    """The whole stack compiled as one graph (the default), block by block (FSDP), and as one graph
    around activation checkpointing."""
    eager = MMFusionModel(tiny_cfg.replace(attention="sdpa"))
    torch.nn.init.normal_(eager.image_head.weight, std=0.02)
    compiled = MMFusionModel(tiny_cfg.replace(attention="sdpa"))
    compiled.load_state_dict(eager.state_dict())
    compiled.backbone.gradient_checkpointing = checkpointing
    if not compile_blocks(compiled, per_block=per_block):
        pytest.skip("no C++ compiler for inductor")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # model files stay the same
    parts = list(compiled.backbone.layers) if per_block else [compiled.backbone]
    assert all(p._compiled_call_impl is not None for p in parts)  # compiled where it should be ...
    assert (compiled.backbone._compiled_call_impl is None) == per_block  # ... and nowhere else
    # two sequence lengths: shapes are dynamic, the second batch must not fail or differ
    for caption in ([4, 9, 10, 2], [4, 9, 10, 11, 12, 13, 2]):
        rows = [fusion_sample(tiny_cfg, [1, 5, 6], [3, 2, 4], caption=caption), fusion_sample(tiny_cfg, [1, 7], [9])]
        batch = collate(rows)
        ref, out = _loss(eager, batch), _loss(compiled, batch)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        ref_grads = torch.autograd.grad(ref, list(eager.parameters()), allow_unused=True)
        grads = torch.autograd.grad(out, list(compiled.parameters()), allow_unused=True)
        for g, r in zip(grads, ref_grads):
            if r is not None:
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_compiled_lora_matches_eager_loss_and_adapter_gradients(tiny_cfg):
    """`mmfusion finetune` compiles the transformer with peft's LoRA layers inside it (its default): the
    compiled adapter computes the eager loss and the same gradients for every trainable weight, token rows
    included, and saves the same keys."""
    from mmfusion.training.lora import ATTENTION, MLP, add_lora

    base = MMFusionModel(tiny_cfg.replace(attention="sdpa"))
    torch.nn.init.normal_(base.image_head.weight, std=0.02)
    eager = add_lora(copy.deepcopy(base), 4, 8, ATTENTION + MLP, token_rows=[4, 9])
    compiled = add_lora(copy.deepcopy(base), 4, 8, ATTENTION + MLP, token_rows=[4, 9])
    for model in (eager, compiled):  # non-zero B matrices, alike in both: the adapters then shape the loss
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.05)
    if not compile_blocks(compiled):
        pytest.skip("no C++ compiler for inductor")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    trainable = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
    compiled_trainable = [p for _, p in compiled.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n, _ in trainable) and any("trainable_tokens" in n for n, _ in trainable)
    rows = [fusion_sample(tiny_cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 10, 2]), fusion_sample(tiny_cfg, [1, 7], [9])]
    batch = collate(rows)
    ref, out = _loss(eager.base_model.model, batch), _loss(compiled.base_model.model, batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref_grads = torch.autograd.grad(ref, [p for _, p in trainable])
    grads = torch.autograd.grad(out, compiled_trainable)
    for (name, _), g, r in zip(trainable, grads, ref_grads):
        assert r.abs().sum() > 0, name  # every trainable weight is reached
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=name)
