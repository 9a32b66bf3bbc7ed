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
    lora_r: int = 64,
    lora_alpha: int = 128,
    loraplus_lr_ratio: float = 1.0,
    lora_init: Literal["lora", "lora_ga", "pissa", "olora"] = "lora",
    target: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    modules_to_save: str | None = None,
    full: bool = False,
    merge: bool = False,
    steps: int = 300,
    minutes: float | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    image_root: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    precision: str = "auto",
    compile: bool = True,
    new_tokens: Literal["words", "rows", "modules", "off"] = "words",
    caption_fraction: float | None = None,
    text_loss_weight: float | None = None,
    replay: float = 0.0,
    replay_data: str | None = None,
    caption_dropout: float | None = None,
) -> None:
    """Fine-tune a trained model with LoRA (peft) on new captioned images; saves the adapter alone.

    Args:
        data: captioned data (any source `mmfusion train` reads)
        out: adapter output folder
        task: t2i (image loss, T2I order), caption (text loss, caption order) or joint (the training objective)
        lora_r: LoRA rank
        lora_alpha: LoRA alpha (scale = alpha / r)
        loraplus_lr_ratio: learning rate of LoRA's B matrices over --lr (LoRA+; 1 is plain LoRA)
        lora_init: the adapter's start: lora (B = 0), lora_ga (the gradient's main directions), pissa, olora
        target: comma-separated projections to adapt; image_in,image_head_mlp.0,image_head may join the seven
        modules_to_save: comma-separated modules trained fully and saved with the adapter (e.g. image_head)
        full: full fine-tuning instead of LoRA (saves a whole model folder; for comparison)
        merge: also write OUT/merged, the model with the adapter merged in
        steps: training steps
        minutes: stop after this many minutes even if steps remain
        lr: learning rate (default: 3e-3 for LoRA, 1e-3 for --full), held, then down to a tenth in the run's last fifth
        batch_size: images per step
        seed: random seed
        precision: auto, 32-true or bf16-mixed
        compile: torch.compile the transformer (faster steps after some seconds of compiling; needs g++ on CPU)
        new_tokens: words (new words spelt in pieces become tokens; the rows captions use train), rows, modules, off
        caption_fraction: share of caption-order samples (default: t2i 0, caption 1, joint 0.15)
        text_loss_weight: text loss x this (default: joint 0.02, caption 1; t2i: no caption samples)
        replay: share of the rows from the base's own data, against forgetting (e.g. 0.2; shapes bases render them)
        replay_data: the base's training data, for --replay (any base not trained on the built-in shapes)
        caption_dropout: share of T2I samples trained without their caption, for CFG (default: the base's)
    """
    _run(**locals())  # every option by name


def _run(target: str, modules_to_save: str | None, **options: object) -> None:
    from mmfusion.training.finetune import finetune

    report = finetune(**options, targets=_names(target), modules_to_save=_names(modules_to_save))
    steps, seconds = report["steps"], report["seconds"]
    print(f"{report['mode']} fine-tuning: {steps} steps in {seconds:.0f} s; saved to {options['out']}")
    print(f"it samples at guidance {report['cfg_scale']:g} unless told otherwise (--cfg)")


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names, as a tuple (None for none)."""
    return tuple(t.strip() for t in (text or "").split(",") if t.strip()) or None
