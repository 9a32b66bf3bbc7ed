"""AdamW's fused kernel under bf16-mixed, with the gradient clipping Lightning would refuse for it."""

import lightning as L
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
