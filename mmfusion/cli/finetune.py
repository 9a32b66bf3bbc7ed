"""`mmfusion finetune`."""

# Deferred imports: the command imports torch and the library when it runs, so `--help` stays instant

from __future__ import annotations

from typing import Literal


def finetune(
    *,
    model: str,
    data: str,
    out: str,
    task: Literal["t2i", "caption", "joint"] = "joint",
    lora_r: int = 8,
    lora_alpha: int = 16,
    target: str = "q_proj,k_proj,v_proj,o_proj",
    modules_to_save: str | None = None,
    full: bool = False,
    merge: bool = False,
    steps: int = 300,
    minutes: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    image_root: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    precision: str = "auto",
    new_tokens: Literal["rows", "modules", "off"] = "rows",
    caption_fraction: float | None = None,
    text_loss_weight: float | None = None,
) -> None:
    """Fine-tune a trained model with LoRA (peft) on new captioned images; saves the adapter alone.

    Only the adapter (and --modules-to-save, --new-tokens' rows) trains; --merge adds OUT/merged, a model folder.

    Args:
        data: captioned data (any source `mmfusion train` reads)
        out: adapter output folder
        task: t2i (image loss, T2I order), caption (text loss, caption order) or joint (the training objective)
        lora_r: LoRA rank
        lora_alpha: LoRA alpha (scale = alpha / r)
        target: comma-separated projections to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
        modules_to_save: comma-separated modules trained fully and saved with the adapter (e.g. image_head)
        full: full fine-tuning instead of LoRA (saves a whole model folder; for comparison)
        merge: also write OUT/merged, the model with the adapter merged in
        steps: training steps
        minutes: stop after this many minutes even if steps remain
        lr: learning rate
        batch_size: images per step
        seed: random seed
        image_root: folder that the image paths of a COCO / Karpathy JSON are relative to
        precision: auto, 32-true or bf16-mixed
        new_tokens: train the token rows the captions use in the text embedding and head (rows), both whole (modules)
        caption_fraction: share of caption-order samples (default: t2i 0, caption 1, joint 0.5)
        text_loss_weight: text loss x this (default: 1; t2i has no caption samples)
    """
    from mmfusion.training.finetune import finetune as run

    targets = tuple(t.strip() for t in target.split(",") if t.strip())
    save = [m.strip() for m in modules_to_save.split(",")] if modules_to_save else None
    lora = dict(lora_r=lora_r, lora_alpha=lora_alpha, targets=targets, modules_to_save=save, full=full, merge=merge)
    budget = dict(steps=steps, minutes=minutes, lr=lr, batch_size=batch_size, seed=seed, precision=precision)
    loss = dict(new_tokens=new_tokens, caption_fraction=caption_fraction, text_loss_weight=text_loss_weight)
    reading = dict(image_root=image_root, image_column=image_column, caption_column=caption_column)
    report = run(model, data, out, task=task, **reading, **lora, **budget, **loss)
    print(f"{report['mode']} fine-tuning: {report['steps']} steps in {report['seconds']:.0f} s; saved to {out}")
