"""`mmfusion finetune`: adapt a trained model to new images / captions with LoRA (or fully).

Tasks: `t2i` (T2I order only, image loss), `caption` (caption order only, text loss only) or
`joint` (the objective the model was trained with).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L

from mmfusion.config import DataConfig, ObjectiveConfig, RunConfig, TrainConfig
from mmfusion.data.datamodule import MMFusionDataModule
from mmfusion.errors import UserError
from mmfusion.hub import data_name
from mmfusion.model.adapters import base_fingerprint, write_record
from mmfusion.pipeline import MMFusion
from mmfusion.training.callbacks import lightning_warnings_filtered, stopped, stopped_at
from mmfusion.training.lora import ATTENTION, add_lora, parameter_counts
from mmfusion.training.module import MMFusionModule
from mmfusion.training.trainer import build_trainer, choose_precision

TASKS = ("t2i", "caption", "joint")


def task_objective(base: dict[str, Any], task: str) -> ObjectiveConfig:
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    obj = ObjectiveConfig(**base)
    if task == "t2i":
        return dataclasses.replace(obj, t2i_fraction=1.0)
    if task == "caption":
        return dataclasses.replace(obj, t2i_fraction=0.0, caption_image_loss_weight=0.0, text_loss_weight=1.0)
    return obj


def _run_config(
    pipe: MMFusion,
    data: str,
    out: Path,
    task: str,
    steps: int,
    minutes: float | None,
    lr: float,
    batch_size: int,
    seed: int,
    image_root: str | None,
    precision: str,
) -> RunConfig:
    return RunConfig(
        model=pipe.model.cfg,
        image=pipe.image_cfg,
        diffusion=pipe.diffusion,
        objective=task_objective(pipe.objective, task),
        sample=pipe.sampling,
        data=DataConfig(
            source=data,
            image_root=image_root,
            batch_size=batch_size,
            max_text_len=pipe.text_tokenizer.max_len,
            resize=pipe.resize,
        ),
        train=TrainConfig(
            out=str(out / "run"),
            seed=seed,
            max_steps=steps,
            max_time_minutes=minutes,
            lr=lr,
            warmup_steps=min(20, steps // 10),
            ema_decay=0.0,
            checkpoint_every_n_steps=max(steps, 1),
            log_every_n_steps=10,
            precision=precision,
        ),
    )


def _save(pipe: MMFusion, net: Any, out: Path, full: bool, merge: bool, base: tuple[str, str]) -> None:
    """A whole model folder (`full`), or the adapter alone, with the record of its `base` (name,
    fingerprint), and with `merge` OUT/merged as well."""
    pipe.model = net
    if full:
        pipe.save_pretrained(out)
        return
    net.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors only
    write_record(out, base[1], base[0])  # mmfusion_adapter.json: another base refuses this adapter
    if merge:
        pipe.model = net.merge_and_unload().eval()
        pipe.save_pretrained(out / "merged")


def finetune(
    model: str | Path,
    data: str,
    out: str | Path,
    task: str = "joint",
    lora_r: int = 8,
    lora_alpha: int = 16,
    targets: tuple[str, ...] = ATTENTION,
    modules_to_save: list[str] | None = None,
    full: bool = False,
    steps: int = 300,
    minutes: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    merge: bool = False,
    seed: int = 0,
    image_root: str | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Fine-tune; saves the adapter alone (or, with `full`, a whole model folder) to `out`."""
    pipe = MMFusion.from_pretrained(model)
    pipe.training_data = f"{pipe.training_data or 'unrecorded'}, then fine-tuned on {data_name(data)}"
    out = Path(out)
    # a bad --steps, --minutes, --precision ... is a ConfigError here: one line, before any output
    cfg = _run_config(pipe, data, out, task, steps, minutes, lr, batch_size, seed, image_root, precision)
    L.seed_everything(seed, verbose=False)
    base = (str(model), base_fingerprint(pipe.model))
    net = pipe.model.train()
    if full:
        net.requires_grad_(True)
    else:
        net = add_lora(net, lora_r, lora_alpha, targets, modules_to_save=modules_to_save)
    trainable, total = parameter_counts(net)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    module = MMFusionModule(cfg, pipe.text_tokenizer, model=net, image_tokenizer=pipe.image_tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = MMFusionDataModule(
        cfg.data, cfg.image.image_size, out / "run", tokenizer=pipe.text_tokenizer, seed=seed, total_steps=steps
    )
    start = time.perf_counter()
    trainer = build_trainer(cfg, out / "run", choose_precision(precision), enable_checkpointing=False)
    with lightning_warnings_filtered():
        trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    step = stopped_at(trainer)
    if step is not None:
        raise stopped(trainer, f"stopped by SIGTERM at step {step}; fine-tuning keeps no checkpoint: nothing saved")
    _save(pipe, net.eval(), out, full, merge, base)
    report = {
        "task": task,
        "mode": "full" if full else "lora",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": int(trainer.global_step),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / "finetune_report.json").write_text(json.dumps(report, indent=2))
    return report
