"""Helper for test_fsdp.py: `mmfusion.training.run.train` on the tiny config with N processes (N = 1: one
process, no strategy; N = 2: train.strategy=fsdp over gloo), recording to OUT:

- losses.pt: every step's loss, averaged over the processes (the loss of the global batch);
- grads.pt: the gradients of the first step as the optimizer takes them (reduced over the processes
  and gathered whole, the ones no process used dropped), before clipping;
- init.pt / final.pt: the live weights (gathered whole) at the start and the end.

Usage: fsdp_run.py OUT DEVICES BATCH [--resume] OVERRIDES..."""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from mmfusion.training import run
from mmfusion.training.module import MMFusionModule
from mmfusion.training.sharded import full_state_dict
from tests.training.ddp_run import config


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    if torch.distributed.is_initialized():
        return full_state_dict(module.model)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.losses = out, []

    def _save(self, trainer: L.Trainer, obj: object, name: str) -> None:
        if trainer.is_global_zero:
            torch.save(obj, self.out / name)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, _weights(module), "init.pt")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, idx) -> None:  # noqa: ANN001
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, _weights(module), "final.pt")
        self._save(trainer, self.losses, "losses.pt")


def record_first_grads(out: Path) -> None:
    """Save the first step's gradients as the optimizer takes them (reduced over the processes, the ones
    no process used dropped), right after the module's own `on_before_optimizer_step`, before clipping."""
    hook = MMFusionModule.on_before_optimizer_step

    def recorded(module: MMFusionModule, optimizer: torch.optim.Optimizer) -> None:
        hook(module, optimizer)
        if module.global_step == 0:
            grads = {n: _whole(p.grad) for n, p in module.model.named_parameters() if p.grad is not None}
            if module.trainer.is_global_zero:
                torch.save(grads, out / "grads.pt")

    MMFusionModule.on_before_optimizer_step = recorded


def main(out: str, devices: int, batch: int, args: list[str]) -> None:
    resume = "--resume" in args
    overrides = [a for a in args if a != "--resume"]
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    record_first_grads(out_path)
    build = run.build_trainer
    run.build_trainer = lambda *a, **k: build(*a, extra_callbacks=[Record(out_path)], **k)
    run.train(config(out, devices, batch, overrides, strategy="fsdp"), resume=resume)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
