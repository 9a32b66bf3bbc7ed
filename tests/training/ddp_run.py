"""Helper for test_ddp.py: train the tiny config with N processes (Lightning DDP, gloo on CPU) and
save every rank's initial and final weights to OUT/rank{r}_init.pt and OUT/rank{r}.pt. BATCH is the
global batch (data.global_batch_size): each of the N processes takes BATCH / N. With `--run` first, the
run goes through `mmfusion.training.run.train` instead, and each rank then writes whether its process
group is still open to OUT/group_open_rank{r}.txt."""

import os
import sys
from pathlib import Path

import lightning as L
import torch

from mmfusion.config import RunConfig, load_config
from mmfusion.data.datamodule import MMFusionDataModule
from mmfusion.training.module import MMFusionModule
from mmfusion.training.run import train
from mmfusion.training.trainer import build_trainer


class SaveRankWeights(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def _save(self, trainer: L.Trainer, module: L.LightningModule, suffix: str) -> None:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}{suffix}.pt")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "_init")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "")


def config(out: str, devices: int, batch: int, overrides: list[str], strategy: str = "ddp") -> RunConfig:
    return load_config(
        None,
        [
            *overrides,
            f"train.out={out}",
            f"train.devices={devices}",
            f"data.global_batch_size={batch}",
            "train.accelerator=cpu",
            f"train.strategy={strategy if devices > 1 else 'auto'}",
        ],
    )


def main(out: str, devices: int, batch: int, overrides: list[str], strategy: str = "ddp") -> None:
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    cfg = config(out, devices, batch, overrides, strategy)
    L.seed_everything(cfg.train.seed, verbose=False)
    data = MMFusionDataModule(
        cfg.data,
        cfg.image.image_size,
        Path(out).parent / "data_run",
        seed=cfg.train.seed,
        total_steps=cfg.train.max_steps,
    )
    module = MMFusionModule(cfg, data.text_tokenizer())
    trainer = build_trainer(cfg, out_path, "32-true", [SaveRankWeights(out_path)], enable_checkpointing=False)
    trainer.fit(module, datamodule=data)


def run_and_report(out: str, devices: int, batch: int, overrides: list[str]) -> None:
    train(config(out, devices, batch, overrides))
    rank = os.environ.get("LOCAL_RANK", "0")
    Path(out, f"group_open_rank{rank}.txt").write_text(str(torch.distributed.is_initialized()))


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        run_and_report(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
