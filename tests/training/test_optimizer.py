"""AdamW's fused kernel under bf16-mixed, with the gradient clipping Lightning would refuse for it."""

import lightning as L
import pytest
import torch

import mmfusion.training.run as run
from mmfusion.config import load_config
from tests.conftest import TINY_RUN


class GradNorms(L.Callback):
    """Total gradient norm before clipping (on_before_optimizer_step) and after the optimizer step
    (the gradients stay until the next step's zero_grad), and whether the optimizer is fused."""

    def __init__(self) -> None:
        self.before, self.after, self.fused = [], [], []

    @staticmethod
    def norm(module: L.LightningModule) -> float:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        self.before.append(self.norm(module))
        self.fused.append(all(g["fused"] for g in optimizer.param_groups))

    def on_train_batch_end(self, trainer, module, *args) -> None:  # noqa: ANN001, ANN002
        self.after.append(self.norm(module))


def test_fused_adamw_clips_under_bf16_mixed(tmp_path, monkeypatch):
    norms = GradNorms()
    build = run.build_trainer
    monkeypatch.setattr(run, "build_trainer", lambda *a, **k: build(*a, **k, extra_callbacks=[norms]))
    clip = 1e-3  # far below the tiny model's gradient norm, so every step clips
    overrides = ["train.precision=bf16-mixed", "train.max_steps=3", f"train.grad_clip={clip}", f"train.out={tmp_path}"]
    cfg = load_config(None, [*TINY_RUN, *overrides])
    run.train(cfg)
    assert norms.fused == [True] * 3
    assert min(norms.before) > 10 * clip
    assert max(norms.after) <= clip * 1.01


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_loraplus_gives_the_b_matrices_their_own_learning_rate(ratio, tmp_path):
    """LoRA+: every trainable parameter in exactly one group; LoRA's B matrices at `ratio` x lr, through
    the warm-up schedule as well, and everything else at lr (one group fewer at ratio 1)."""
    from mmfusion.data.datamodule import MMFusionDataModule
    from mmfusion.training.lora import add_lora
    from mmfusion.training.module import MMFusionModule

    overrides = ["train.lr=1e-3", "train.warmup_steps=10", f"train.loraplus_lr_ratio={ratio}", f"train.out={tmp_path}"]
    cfg = load_config(None, [*TINY_RUN, *overrides])
    module = MMFusionModule(cfg, MMFusionDataModule(cfg.data, 32, tmp_path).text_tokenizer())
    net = module.model = add_lora(module.model, r=4, alpha=8)
    opt = module.configure_optimizers()
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)
    assert len(optimizer.param_groups) == (2 if ratio == 1.0 else 3)
    names = {id(p): n for n, p in net.named_parameters()}
    for _ in range(3):
        optimizer.step()
        schedule.step()
        base = optimizer.param_groups[0]["lr"]
        assert 0 < base < 1e-3  # still warming up
        for g in optimizer.param_groups:
            is_b = {".lora_B." in names[id(p)] for p in g["params"]}
            assert len(is_b) <= 1 or ratio == 1.0  # a group of B matrices alone, or none of them
            assert g["lr"] == pytest.approx(base * ratio if is_b == {True} else base)
