"""`train.compile`: the compiled transformer, and the compiled training step around it, train as eager ones do."""

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


@pytest.mark.parametrize("kind", ["pixels", "codes", "classes"])
def test_compiled_objective_matches_eager_losses_and_gradients(kind):
    """`train.compile_step` compiles the objective's forward and losses as one graph (`JointObjective.compile`):
    the same loss terms and gradients as eager, for batches of other lengths and without a text loss,
    with no graph break (the rows of each kind of token are found outside the graph), for CausalFusion,
    Token-Shuffle and class-conditional models."""
    import torch._dynamo

    from mmfusion.config import ObjectiveConfig
    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.model.config import ModelConfig
    from mmfusion.training.module import compile_training
    from mmfusion.training.objective import JointObjective
    from tests.training.test_objective import _inputs

    extra = {
        "pixels": {"image_grid": (4, 4), "prompt_attention": "bidirectional", "image_head_hidden": 32},
        "codes": {"image_codebook_size": 64, "shuffle": 2, "image_grid": (2, 2)},
        "classes": {"image_grid": (4, 4), "num_classes": 5},
    }[kind]
    cfg = ModelConfig.from_name("tiny", image_rope=True, attention="sdpa", **extra)
    torch.manual_seed(0)
    eager = MMFusionModel(cfg)
    torch.nn.init.normal_(eager.image_head.weight, std=0.05)
    compiled = copy.deepcopy(eager)
    condition = "class" if kind == "classes" else "text"

    def objective(t2i: float) -> JointObjective:
        settings = ObjectiveConfig(t2i_fraction=t2i, caption_dropout=0.2, pack_length=48, condition=condition)
        return JointObjective(cfg, DiffusionConfig(gamma=0.5), settings, 1, 2, 3, 4)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for n, t2i in ((6, 0.5), (9, 0.5), (5, 1.0)):  # the last: no caption-order sample, no text loss
        ref_obj, obj = objective(t2i), objective(t2i)
        if not compile_training(compiled, obj, step=True):
            pytest.skip("no C++ compiler for inductor")
        assert obj.compiled and compiled.backbone._compiled_call_impl is None  # the step, not the transformer
        tokens, captions = _inputs(cfg, n)
        labels = [i % 5 for i in range(n)] if kind == "classes" else None
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731, B023
        batch = ref_obj.build(tokens, captions, labels, gens())
        want, got = ref_obj.loss(eager, batch), obj.loss(compiled, batch)
        assert set(got) == set(want) and ("text_loss" in want) == (kind != "classes" and t2i < 1)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
        ref_grads = torch.autograd.grad(want["loss"], list(eager.parameters()), allow_unused=True)
        grads = torch.autograd.grad(got["loss"], list(compiled.parameters()), allow_unused=True)
        assert sum(r is not None for r in ref_grads) > 10
        for g, r in zip(grads, ref_grads):
            assert (g is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert not torch._dynamo.utils.counters["graph_break"]  # one graph per kind of batch, nothing eager
    # the first training step's warm-up compiles two sizes of batch and changes nothing
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    obj.warm_up(compiled, batch)
    assert all(p.grad is None for p in compiled.parameters())
    assert all(torch.equal(v, before[k]) for k, v in compiled.state_dict().items())
    assert compiled.state_dict().keys() == eager.state_dict().keys()


class _InsideDDP(torch.nn.Module):
    """A compiled call made inside a DistributedDataParallel forward, as `training_step` makes its own."""

    def __init__(self, scope) -> None:  # noqa: ANN001
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
        self.loss = torch.compile(lambda x: self.layers(x).square().mean(), dynamic=True)
        self.scope = scope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.scope():
            return self.loss(x)


def test_a_small_models_compiled_graph_is_not_cut_at_ddp_buckets(tmp_path, monkeypatch):
    """Inside a DDP forward dynamo hands a compiled graph to its DDPOptimizer, which cuts it at the
    gradient buckets; `graph_scope` keeps a model whose gradients fit in one bucket out of it (its
    graphs whole), and leaves a larger model to it. Without the scope the same call does go through the
    DDPOptimizer: the check can fail."""
    import contextlib

    import torch.distributed as dist
    from torch._dynamo.backends.distributed import DDPOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from mmfusion.model.transformer import can_compile
    from mmfusion.training.module import DDP_BUCKET_BYTES, graph_scope

    if not can_compile():
        pytest.skip("no C++ compiler for inductor")
    big = torch.nn.Module()
    big.weight = torch.nn.Parameter(torch.empty(DDP_BUCKET_BYTES // 4 + 1))
    assert graph_scope(big) is contextlib.nullcontext  # larger than a bucket: dynamo's default
    cuts = []
    compile_fn = DDPOptimizer.compile_fn
    monkeypatch.setattr(DDPOptimizer, "compile_fn", lambda self, *a: cuts.append(1) or compile_fn(self, *a))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for whole in (True, False):
            torch._dynamo.reset()
            cuts.clear()
            module = _InsideDDP(contextlib.nullcontext)
            if whole:
                module.scope = graph_scope(module)
            loss = DistributedDataParallel(module)(torch.randn(4, 8))
            loss.backward()
            assert module.layers[0].weight.grad is not None
            assert bool(cuts) != whole, f"graphs kept whole: {whole}, DDPOptimizer calls: {len(cuts)}"
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
