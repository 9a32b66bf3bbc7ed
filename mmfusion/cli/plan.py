"""`mmfusion plan`: a GPU run on paper (parameters, FLOPs, memory per GPU, time to train)."""

from __future__ import annotations

from mmfusion.config import load_config
from mmfusion.training import plan as planning


def plan(
    overrides: list[str] = [],  # noqa: B006
    *,
    config: str | None = None,
    gpus: int = 32,
    gpu_memory: float = 80.0,
    gpu_tflops: float = planning.H100_BF16_TFLOPS,
    mfu: float = 0.4,
    steps: int | None = None,
) -> None:
    """Work out a training run on paper: parameters, FLOPs per step, memory per GPU (weights,
    gradients, AdamW state, EMA, activations with and without activation checkpointing) for DDP and for
    FSDP, and the time the schedule takes. Nothing is built or run; the formulas are in
    docs/how-it-works.md ("Planning a run").

    Example: mmfusion plan --config configs/L.yaml --gpus 32

    Args:
        overrides: dotted overrides such as data.global_batch_size=2048 train.accumulate_grad_batches=2
        config: a YAML run config (see configs/); defaults are used where it is silent
        gpus: GPUs of the run (data-parallel processes)
        gpu_memory: memory of one GPU, in GB
        gpu_tflops: dense TFLOP/s of one GPU in the training precision (989: H100 SXM, bf16)
        mfu: model-FLOPs utilisation to assume, in (0, 1]
        steps: optimizer steps to time (default: the config's train.max_steps)
    """
    cfg = load_config(config, overrides)
    estimate = planning.plan(cfg, gpus, gpu_memory, gpu_tflops, mfu, steps)
    print(planning.table(estimate))
