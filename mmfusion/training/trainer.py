"""The Lightning Trainer of a run: precision (bf16 where this machine multiplies it natively), the
process strategy (DDP, FSDP, SLURM), callbacks, logger and checkpoints, from a RunConfig."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from mmfusion.config import RunConfig
from mmfusion.errors import ConfigError, UserError
from mmfusion.runtime import matmul_gflops
from mmfusion.training.callbacks import (
    StepVote,
    ThroughputLog,
    ValidationSamples,
    budget_clock,
    interrupt_notice,
    step_progress_bar,
)
from mmfusion.training.checkpoint import AtomicCheckpointIO
from mmfusion.training.sharded import ShardedDataParallel


def choose_precision(requested: str, accelerator: str = "auto") -> str:
    """`auto`: bf16-mixed on GPUs; on CPU, bf16-mixed only where bf16 matmuls are measured faster.
    Measured once per process, and the processes Lightning's launcher starts take the choice of the one
    that started them (from its environment), so that all ranks train in one precision and say it once.
    Processes started by torchrun or srun measure each on their own: give train.precision explicitly
    there."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    inherited = os.environ.get(AUTO_PRECISION_ENV)
    if inherited:  # measured before, by this process or the one that launched it
        return inherited
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    choice = "bf16-mixed" if bf16 > 1.2 * fp32 else "32-true"
    print(f"precision auto: matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s -> {choice}")
    os.environ[AUTO_PRECISION_ENV] = choice
    return choice


AUTO_PRECISION_ENV = "MMFUSION_AUTO_PRECISION"


def make_strategy(t: Any) -> Any:
    """Lightning strategy from its name. DDP looks for unused parameters: a batch without captions
    leaves the text head out of the graph, a class-conditional one the text embeddings. It does not
    broadcast the model's buffers before every forward: they are tables computed from the config
    (rotary frequencies, position embeddings), the same in every process."""
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True, broadcast_buffers=False)
    if t.strategy == "fsdp":
        return fsdp_strategy(t)
    return t.strategy


def fsdp_strategy(t: Any) -> Any:
    """Sharded data parallel with FSDP2 (mmfusion.training.sharded), on GPUs and CPUs: every block a
    shard unit, sharded checkpoints. Activation checkpointing is the model's own (`train.activation_checkpointing`
    recomputes each block in the backward, sharded or not)."""
    return ShardedDataParallel()


def build_trainer(
    cfg: RunConfig, out: Path, precision: str, extra_callbacks: list | None = None, enable_checkpointing: bool = True
) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    t = cfg.train
    every = min(t.log_every_n_steps, t.max_steps)  # a shorter run than the interval: Lightning warns
    # the step's vote (SIGTERM, the budget, a non-finite loss: one rank stopping alone would hang DDP) comes
    # before the callbacks after it, so that they see a stop at the step it comes
    clock = [budget_clock(t.max_time_minutes)] if t.max_time_minutes else []
    vote = StepVote(t.max_time_minutes)
    callbacks: list[L.Callback] = [step_progress_bar(t.max_time_minutes), *clock, vote, ThroughputLog(every)]
    if enable_checkpointing:
        callbacks.append(interrupt_notice(out))
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                every_n_train_steps=t.checkpoint_every_n_steps,
                save_last=True,
                save_top_k=-1 if t.keep_all_checkpoints else 0,
                filename="step{step}",
                auto_insert_metric_name=False,
            )
        )
    callbacks += [LearningRateMonitor(logging_interval="step"), *(extra_callbacks or [])]
    if t.val_every_n_steps:
        callbacks.append(ValidationSamples(t.val_samples))
    logger = make_logger(t.logger, out)
    try:
        return _trainer(t, out, precision, callbacks, logger, enable_checkpointing, every)
    except (MisconfigurationException, ValueError) as err:  # Lightning refusing a setting: one line
        raise UserError(f"train: {err}") from err


def make_logger(kind: str, out: Path) -> Any:
    """Lightning's CSV, TensorBoard or wandb logger, writing under OUT (wandb: `WANDB_MODE=offline` logs
    with no network; the package is optional)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if kind == "tensorboard":
        return TensorBoardLogger(out, name="logs")
    if kind != "wandb":
        return CSVLogger(out, name="logs")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.logger", "wandb needs the wandb package: pip install 'mmfusion[wandb]'")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        save_dir=str(out), name=out.name, project="mmfusion", offline=os.environ.get("WANDB_MODE") == "offline"
    )


def _trainer(
    t: Any, out: Path, precision: str, callbacks: list, logger: Any, enable_checkpointing: bool, every: int
) -> L.Trainer:
    return L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(t),
        precision=precision,
        gradient_clip_val=t.grad_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=every,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO(), *slurm_without_requeue()],
        enable_checkpointing=enable_checkpointing,
        enable_model_summary=False,
        default_root_dir=out,
        num_sanity_val_steps=0,
        limit_val_batches=t.val_batches if t.val_every_n_steps else 0,
        val_check_interval=t.val_every_n_steps or None,
        check_val_every_n_epoch=None,
        max_epochs=-1,
        use_distributed_sampler=False,  # StepBatchSampler shards the global batch itself
    )


def slurm_without_requeue() -> list[Any]:
    """Where Lightning would pick SLURM's environment, the same environment with its SIGUSR1 auto-requeue
    off: that handler saves a checkpoint from inside the signal handler, a collective the other ranks
    are not making then. SIGTERM does this job (`StepVote`, scripts/slurm_train.sh)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():  # Lightning's own order
        return []
    return [SLURMEnvironment(auto_requeue=False)]
