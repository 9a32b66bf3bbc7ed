"""Helper for test_ddp.py: train the tiny config with N processes (Lightning DDP, gloo on CPU) and
save every rank's initial and final weights to OUT/rank{r}_init.pt and OUT/rank{r}.pt. BATCH is the
global batch (data.global_batch_size): each of the N processes takes BATCH / N. With `--run` first, the
run goes through `mmfusion.training.run.train` instead, and each rank then writes whether its process
group is still open to OUT/group_open_rank{r}.txt.

With MMFUSION_TEST_NAN_AT="STEP,RANK" in the environment, the loss of optimizer step STEP (counted from
0) is NaN on process RANK alone, and each rank writes OUT/collectives_rank{r}.pt: every collective it
called from Python (broadcast_object_list counts as the two broadcasts it makes), as (step, name)
pairs, and the non-finite steps it counted."""

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


class Step(L.Callback):
    """Keeps the step and rank where the patched functions below can read them."""

    now = {"step": -1, "rank": 0}

    def on_train_batch_start(self, trainer: L.Trainer, *_: object) -> None:
        self.now.update(step=trainer.global_step, rank=trainer.global_rank)


def poison_and_count(at: str) -> list[tuple[int, str]]:
    """The loss NaN at step, rank `at` ("STEP,RANK"); the collectives made, as they are made."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from mmfusion.training.objective import JointObjective

    step, rank = (int(x) for x in at.split(","))
    made: list[tuple[int, str]] = []
    real_loss = JointObjective.loss

    def loss(self, model, batch):  # noqa: ANN001, ANN202
        out = real_loss(self, model, batch)
        if (Step.now["step"], Step.now["rank"]) == (step, rank):
            out["loss"] = out["loss"] * float("nan")
        return out

    JointObjective.loss = loss
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "barrier"):
        real = getattr(c10d, name)

        def counted(*args, _real=real, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            made.append((Step.now["step"], _name))
            return _real(*args, **kwargs)

        setattr(c10d, name, counted)  # where broadcast_object_list looks them up
        setattr(dist, name, counted)  # where Lightning and mmfusion do
    return made


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
    at = os.environ.get("MMFUSION_TEST_NAN_AT")
    made = poison_and_count(at) if at else []
    trainer = build_trainer(cfg, out_path, "32-true", [SaveRankWeights(out_path), Step()], enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    if at:
        counted = {"collectives": made, "nonfinite": module.nonfinite_total}
        torch.save(counted, out_path / f"collectives_rank{trainer.global_rank}.pt")


def run_and_report(out: str, devices: int, batch: int, overrides: list[str]) -> None:
    train(config(out, devices, batch, overrides))
    rank = os.environ.get("LOCAL_RANK", "0")
    Path(out, f"group_open_rank{rank}.txt").write_text(str(torch.distributed.is_initialized()))


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        run_and_report(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
