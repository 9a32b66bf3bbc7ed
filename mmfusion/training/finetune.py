"""`mmfusion finetune`: adapt a trained model to new images / captions with LoRA (or fully).

Tasks: `t2i` (T2I order only, image loss), `caption` (caption order only, text loss only) or
`joint` (T2I and caption order, weighted for a task whose point includes captions: `task_objective`).

New vocabulary: the words of the new captions that the base's tokenizer spells in pieces become tokens of
their own (`new_tokens="words"`, the default: `add_words`), and the caption token ids the fine-tuning data
uses are made trainable in `embed_tokens` and `lm_head` ("rows" does the latter alone; "modules" trains
both whole; "off" neither). Under LoRA alone those rows are frozen, and a word the base never produced
cannot be learned (issue 33).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning as L

from mmfusion.config import DataConfig, ObjectiveConfig, RunConfig, TrainConfig
from mmfusion.data.datamodule import MMFusionDataModule
from mmfusion.data.datasets import load_captioned
from mmfusion.data.shapes import build_shapes
from mmfusion.errors import UserError
from mmfusion.generation.settings import SampleConfig
from mmfusion.hub import data_name
from mmfusion.model.adapters import base_fingerprint, write_record
from mmfusion.pipeline import MMFusion
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.callbacks import lightning_warnings_filtered, stopped, stopped_at
from mmfusion.training.lora import (
    ATTENTION,
    MLP,
    add_lora,
    initial_factors,
    parameter_counts,
    save_as_plain_lora,
    weight_space_training,
)
from mmfusion.training.module import MMFusionModule
from mmfusion.training.trainer import build_trainer, choose_precision

TASKS = ("t2i", "caption", "joint")
NEW_TOKENS = ("words", "rows", "modules", "off")
# "words": a word of the new captions that the base spells in pieces becomes one token when it occurs this
# often, the most frequent first, up to this many
MIN_WORD_COUNT, MAX_NEW_WORDS = 10, 256
JOINT_CAPTION_FRACTION, JOINT_TEXT_LOSS_WEIGHT = 0.15, 0.02
# learning rates by default: the adapter's low-rank updates want a larger step than the whole model's
# (scripts/downstream.py, docs/experiments.md)
LORA_LR, FULL_LR = 3e-3, 1e-3
GRADIENT_BATCHES = 8  # LoRA-GA: the training batches its gradient estimate averages over
# the guidance scale a fine-tuned CausalFusion model samples with unless told otherwise (docs/training.md)
FINETUNED_CFG_SCALE = 2.0


def task_objective(
    base: dict[str, Any],
    task: str,
    caption_fraction: float | None = None,
    text_loss_weight: float | None = None,
    caption_dropout: float | None = None,
) -> ObjectiveConfig:
    """The objective of a fine-tuning `task`, from the base's own (`base`); `caption_fraction` (the share of
    caption-order samples) and `text_loss_weight` override the task's defaults when given;
    `caption_dropout` (the T2I samples trained without their caption, the unconditional stream of CFG)
    overrides the base's.

    t2i: caption fraction 0. caption: caption fraction 1, text loss x 1, no image loss. joint: caption
    fraction 0.15 and text loss x 0.02, the demo recipe's own (0.1 and x 0.01 in the paper). Only a T2I
    sample teaches what a new word looks like (a caption-order image comes before its caption, so its image
    loss is unconditional), and the text loss, cross-entropy in nats well above the image loss, takes what
    the adapter learns from the image loss: at x 1 the new pictures went undrawn, and each step from x 1
    to x 0.1 to x 0.02 (with a quarter, then 0.15, in caption order) drew more of the new domains. The new
    words are still learnt, as whole tokens whose rows train (`add_words`), and the captions hold as the
    models decode them (docs/experiments.md, the downstream benchmark, rounds 5, 14 and 23). The same with
    replay: half in caption order at x 0.1, its earlier setting, drew fewer of both the old task's and the
    new domain's pictures, for a few more captions right (round 28).
    """
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if caption_fraction is not None and not 0.0 <= caption_fraction <= 1.0:
        raise UserError(f"--caption-fraction must be between 0 and 1, got {caption_fraction}")
    if text_loss_weight is not None and text_loss_weight < 0:
        raise UserError(f"--text-loss-weight must be at least 0, got {text_loss_weight}")
    if caption_dropout is not None and not 0.0 <= caption_dropout < 1.0:
        raise UserError(f"--caption-dropout must be at least 0 and below 1, got {caption_dropout}")
    obj = ObjectiveConfig(**base)
    if task == "t2i":
        obj = dataclasses.replace(obj, t2i_fraction=1.0)
    elif task == "caption":
        obj = dataclasses.replace(obj, t2i_fraction=0.0, caption_image_loss_weight=0.0, text_loss_weight=1.0)
    else:
        obj = dataclasses.replace(obj, t2i_fraction=1 - JOINT_CAPTION_FRACTION, text_loss_weight=JOINT_TEXT_LOSS_WEIGHT)
    if caption_fraction is not None:
        obj = dataclasses.replace(obj, t2i_fraction=1.0 - caption_fraction)
    if text_loss_weight is not None:
        obj = dataclasses.replace(obj, text_loss_weight=text_loss_weight)
    if caption_dropout is not None:
        obj = dataclasses.replace(obj, caption_dropout=caption_dropout)
    return obj


def data_token_ids(datamodule: MMFusionDataModule, tokenizer: TextTokenizer) -> Counter[int]:
    """How often each caption token id occurs in the training split of the fine-tuning data."""
    split = datamodule.load()[datamodule.cfg.train_split]
    counts: Counter[int] = Counter()
    for caps in split["captions"]:
        for caption in caps or []:
            counts.update(tokenizer.encode(caption))
    return counts


def add_words(mode: str, pipe: MMFusion, datamodule: MMFusionDataModule) -> list[str]:
    """For `mode` "words": the words of the training captions that the base's tokenizer spells in two or
    more tokens (and that occur at least MIN_WORD_COUNT times) become whole tokens, in the tokenizer of
    `pipe` and `datamodule` and in the model, each starting from the mean of its pieces' rows
    (`MMFusionModel.resize_vocab`); printed, and returned as text. A caption then costs the model as many tokens
    as the base's own captions did (a spelt word is a run of pieces that every sample pays for and
    that the model must learn to read as one), and the word has one row of its own to learn."""
    if mode not in NEW_TOKENS:
        raise UserError(f"--new-tokens must be one of {', '.join(NEW_TOKENS)}, got {mode!r}")
    tok = pipe.text_tokenizer
    if mode != "words" or pipe.condition != "text":
        return []
    why = tok.cannot_take_words() or (
        f"the model has {pipe.model.cfg.vocab_size} text rows for {len(tok)} tokens"
        if pipe.model.cfg.vocab_size != len(tok)
        else None
    )
    if why:
        print(f"new words: {why}: words stay spelt")
        return []
    captions = (c for caps in datamodule.load()[datamodule.cfg.train_split]["captions"] for c in caps or [])
    counts = tok.word_counts(captions)
    vocab = tok.tokenizer.get_vocab()
    spelt = {w: tok.pieces(w) for w, n in counts.most_common() if n >= MIN_WORD_COUNT and w not in vocab}
    words = [w for w, pieces in spelt.items() if len(pieces) > 1][:MAX_NEW_WORDS]
    if not words:
        return []
    pipe.model.resize_vocab([spelt[w] for w in words])
    pipe.text_tokenizer = datamodule.tokenizer = tok.with_words(words)
    texts = [tok.word_text(w) for w in words]
    shown = ", ".join(map(repr, texts[:8])) + (f" and {len(words) - 8} more" if len(words) > 8 else "")
    print(f"new words: {len(words)} words of the captions are now one token each ({shown})")
    return texts


def token_rows(mode: str, datamodule: MMFusionDataModule, tokenizer: TextTokenizer) -> list[int]:
    """The token ids to train for `mode` (every id the new captions use; none when "off"), printed."""
    if mode == "off":
        return []
    counts = data_token_ids(datamodule, tokenizer)
    rarest = ", ".join(repr(tokenizer.decode([i])) for i, _ in counts.most_common()[::-1][:6])
    where = "all of" if mode == "modules" else "those rows of"
    print(
        f"new tokens: the captions use {len(counts)} token ids (rarest: {rarest}); "
        f"training {where} the text embedding and head"
    )
    return sorted(counts)


def _run_config(
    pipe: MMFusion,
    data: str,
    out: Path,
    objective: ObjectiveConfig,
    batch_size: int,
    reading: dict[str, str | None],
    **train: Any,
) -> RunConfig:
    """The run's config: the base's model, image and diffusion settings, the data, and `train`'s
    TrainConfig fields over fine-tuning's own defaults: no EMA, one checkpoint at the end, and the rate
    held, then brought down to a tenth over the last fifth of the steps or of the time budget (`wsd`), so that
    a run cut by its time budget still ends at a low rate."""
    steps = train["max_steps"]
    return RunConfig(
        model=pipe.model.cfg,
        image=pipe.image_cfg,
        diffusion=pipe.diffusion,
        objective=objective,
        sample=pipe.sampling,
        data=DataConfig(
            source=data,
            **reading,  # image_root, image_column, caption_column
            batch_size=batch_size,
            max_text_len=pipe.text_tokenizer.max_len,
            resize=pipe.resize,
        ),
        train=TrainConfig(
            out=str(out / "run"),
            warmup_steps=min(20, steps // 10),
            ema_decay=0.0,
            lr_schedule="wsd",
            checkpoint_every_n_steps=max(steps, 1),
            log_every_n_steps=10,
            **train,  # seed, max_steps, max_time_minutes, lr, precision, compile, loraplus_lr_ratio
        ),
    )


def sampling_changes(pipe: MMFusion, cfg_scale: float | None) -> dict | None:
    """The changes to the base's sampling settings that the fine-tuned model samples with: the guidance
    scale `cfg_scale`, by default `FINETUNED_CFG_SCALE` for CausalFusion (fine-tuned models draw more of
    the new domain at a lower scale than their base's) and the base's for Token-Shuffle."""
    part = "tokens" if pipe.model.cfg.discrete else "diffusion"
    scale = cfg_scale if cfg_scale is not None or part == "tokens" else FINETUNED_CFG_SCALE
    return None if scale is None else {part: {"cfg_scale": float(scale)}}


def _save(
    pipe: MMFusion, net: Any, out: Path, full: bool, merge: bool, base: tuple, initial: Any, sample: dict | None
) -> SampleConfig:
    """A whole model folder (`full`), or the adapter alone, with the record of its `base` (name,
    fingerprint, text vocabulary size) and of its `sample` changes (`sampling_changes`) and, where new
    words grew the vocabulary, the grown tokenizer.json; with `merge` OUT/merged as well. An adapter started
    from `initial` factors that moved the frozen weights (LoRA-GA, PiSSA, OLoRA) is saved as the plain LoRA
    that gives the same model on the untouched base. Returns the fine-tuned model's sampling settings."""
    pipe.model, pipe.sampling = net, pipe.sampling.changed(sample)
    if full:
        pipe.save_pretrained(out)
        return pipe.sampling
    net.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors only
    if initial is not None:
        save_as_plain_lora(out, initial)
    write_record(out, base[1], base[0], base[2], sample)  # mmfusion_adapter.json: another base refuses it
    if len(pipe.text_tokenizer) > base[2]:  # new words: the adapter's tokenizer, which loading puts in use
        pipe.text_tokenizer.save(out)
    if merge:
        pipe.model = net.merge_and_unload().eval()
        pipe.save_pretrained(out / "merged")
    return pipe.sampling


def _adapt(net: Any, full: bool, lora: dict[str, Any], new_tokens: str, rows: list[int]) -> tuple[Any, Any]:
    """The model to train: whole (`full`), or with LoRA `lora` (r, alpha, targets, modules_to_save, init) and the
    new-token choice (`rows` trainable in the embedding and head, or both modules whole); with the adapter's
    starting factors where its init moved the frozen weights (`initial_factors`), for `_save`."""
    if full:
        net = net.requires_grad_(True)
        _print_trainable(net)
        return net, None
    save = list(lora["modules_to_save"] or [])
    if new_tokens == "modules" and rows:
        save += [m for m in ("embed_tokens", "lm_head") if m not in save]
    trainable_rows = rows if new_tokens in ("words", "rows") and not {"embed_tokens", "lm_head"} & set(save) else None
    kwargs = dict(modules_to_save=save or None, token_rows=trainable_rows, init=lora["init"])
    net = add_lora(net, lora["r"], lora["alpha"], lora["targets"], gradient_step=lora["gradient_step"], **kwargs)
    _print_trainable(net)
    return net, initial_factors(net)


def _gradient_step(cfg: RunConfig, pipe: MMFusion, datamodule: Any) -> Callable[[], None]:
    """LoRA-GA's gradient estimate: the training loss's backward, on the base model, over the run's first
    `GRADIENT_BATCHES` batches (the batches its first steps then train on)."""
    module = MMFusionModule(cfg, pipe.text_tokenizer, model=pipe.model, image_tokenizer=pipe.image_tokenizer)

    def step() -> None:
        with warnings.catch_warnings():  # peft counts the passes with backward hooks on frozen inputs: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _, batch in zip(range(GRADIENT_BATCHES), datamodule.train_dataloader()):
                module.objective.loss(module.model, module.token_batch(batch))["loss"].backward()

    return step


def _print_trainable(net: Any) -> None:
    trainable, total = parameter_counts(net)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")


def replay_mix(
    data: str, replay: float, replay_data: str | None, base_data: str | None, reading: dict, folder: Path, seed: int
) -> str:
    """A saved data set whose train split is `data`'s with old rows mixed in, `replay` of the whole: rows
    of `replay_data`, or, for a base trained on the built-in shapes, freshly rendered shapes. The other
    splits are `data`'s. Returns its path (columns `image` and `captions`, whatever `data` called them)."""
    if not 0 < replay < 1:
        raise UserError(f"--replay is the share of old rows in the fine-tuning data: within (0, 1), got {replay}")
    new = load_captioned(data, **reading)
    k = max(1, round(len(new["train"]) * replay / (1 - replay)))
    if replay_data:
        old = load_captioned(replay_data)["train"].shuffle(seed=seed)
        old = old.select(range(min(k, len(old))))
    elif base_data == "shapes":
        old = build_shapes(n=k, seed=seed + 1000, n_val=1, n_test=1)["train"]
    else:
        raise UserError(f"--replay needs --replay-data (the base's own training data): its data is {base_data!r}")
    columns = ["image", "captions"]
    train = new["train"].select_columns(columns)
    old = old.select_columns(columns).cast(train.features)
    mixed = datasets.concatenate_datasets([train, old]).shuffle(seed=seed)
    splits = {name: split.select_columns(columns) for name, split in new.items() if name != "train"}
    path = folder / "replay_data"
    datasets.DatasetDict({"train": mixed, **splits}).save_to_disk(str(path))
    print(f"replay: {len(old):,} rows of the base's data mixed into {len(train):,} new ones")
    return str(path)


def _measures(
    trainer: Any,
    net: Any,
    seconds: float,
    cfg: RunConfig,
    new_tokens: str,
    rows: int,
    words: list[str],
    sample: SampleConfig,
) -> dict[str, Any]:
    """The report's counts, time, memory, the run's settings and the task's losses, the new-token choice and
    the new words, the guidance scale the fine-tuned model samples with (`sample`), and the last losses."""
    objective = cfg.objective
    trainable, total = parameter_counts(net)
    return {
        "trainable_parameters": trainable,
        "batch_size": cfg.data.batch_size,
        "compile": cfg.train.compile,
        "loraplus_lr_ratio": cfg.train.loraplus_lr_ratio,
        "lr_schedule": cfg.train.lr_schedule,
        "cfg_scale": (sample.tokens if cfg.model.discrete else sample.diffusion).cfg_scale,
        "total_parameters": total,
        "steps": int(trainer.global_step),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "caption_fraction": round(1.0 - objective.t2i_fraction, 9),  # 0.15, not 1 - 0.85 = 0.15000000000000002
        "text_loss_weight": objective.text_loss_weight,
        "caption_dropout": objective.caption_dropout,
        "new_tokens": new_tokens,
        "new_token_rows": rows,
        "new_words": words,
        "final_losses": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")},
    }


def _fit(cfg: RunConfig, pipe: MMFusion, net: Any, datamodule: Any, out: Path) -> tuple[Any, float]:
    """Train `net` (the whole model or its adapter, its projections computed in weight space:
    `weight_space_training`) on the data; (the trainer, seconds it took)."""
    module = MMFusionModule(cfg, pipe.text_tokenizer, model=net, image_tokenizer=pipe.image_tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = build_trainer(cfg, out / "run", choose_precision(cfg.train.precision), enable_checkpointing=False)
    with lightning_warnings_filtered(), weight_space_training(net):
        trainer.fit(module, datamodule=datamodule)
    step = stopped_at(trainer)
    if step is not None:
        raise stopped(trainer, f"stopped by SIGTERM at step {step}; fine-tuning keeps no checkpoint: nothing saved")
    return trainer, time.perf_counter() - start


def finetune(
    model: str | Path,
    data: str,
    out: str | Path,
    task: str = "joint",
    lora_r: int = 64,
    lora_alpha: int = 128,
    loraplus_lr_ratio: float = 1.0,
    lora_init: str = "lora",
    targets: tuple[str, ...] = ATTENTION + MLP,
    modules_to_save: list[str] | None = None,
    full: bool = False,
    steps: int = 300,
    minutes: float | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    merge: bool = False,
    seed: int = 0,
    image_root: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    precision: str = "auto",
    compile: bool = True,
    new_tokens: str = "words",
    caption_fraction: float | None = None,
    text_loss_weight: float | None = None,
    replay: float = 0.0,
    replay_data: str | None = None,
    caption_dropout: float | None = None,
    cfg_scale: float | None = None,
) -> dict[str, Any]:
    """Fine-tune; saves the adapter alone (or, with `full`, a whole model folder) to `out`. Options: the module's
    docstring, `task_objective`, `add_words`, `replay_mix`, `train.compile` and `sampling_changes` (`cfg_scale`)."""
    pipe, out = MMFusion.from_pretrained(model), Path(out)
    base_data = pipe.training_data
    pipe.training_data = f"{pipe.training_data or 'unrecorded'}, then fine-tuned on {data_name(data)}"
    # a bad --steps, --minutes, --precision ... is a ConfigError here: one line, before any output
    objective = task_objective(pipe.objective, task, caption_fraction, text_loss_weight, caption_dropout)
    reading = dict(image_root=image_root, image_column=image_column, caption_column=caption_column)
    if replay:  # the mixed data set has the usual columns
        data, reading = replay_mix(data, replay, replay_data, base_data, reading, out / "run", seed), {}
    train = dict(max_steps=steps, max_time_minutes=minutes, lr=lr or (FULL_LR if full else LORA_LR), seed=seed)
    train |= dict(precision=precision, compile=compile, loraplus_lr_ratio=loraplus_lr_ratio)
    cfg = _run_config(pipe, data, out, objective, batch_size, reading, **train)
    L.seed_everything(seed, verbose=False)
    base = (str(model), base_fingerprint(pipe.model), pipe.model.cfg.vocab_size)
    datamodule = MMFusionDataModule(
        cfg.data, cfg.image.image_size, out / "run", tokenizer=pipe.text_tokenizer, seed=seed, total_steps=steps
    )
    words = add_words(new_tokens if full or task != "t2i" else "off", pipe, datamodule)  # rows train them
    rows = [] if full or task == "t2i" else token_rows(new_tokens, datamodule, pipe.text_tokenizer)
    lora = {"r": lora_r, "alpha": lora_alpha, "targets": targets, "modules_to_save": modules_to_save, "init": lora_init}
    lora["gradient_step"] = _gradient_step(cfg, pipe, datamodule) if lora_init == "lora_ga" else None
    net, initial = _adapt(pipe.model.train(), full, lora, new_tokens, rows)
    trainer, seconds = _fit(cfg, pipe, net, datamodule, out)
    sample = _save(pipe, net.eval(), out, full, merge, base, initial, sampling_changes(pipe, cfg_scale))
    report = dict(task=task, mode="full" if full else "lora", lora_init=None if full else lora_init, replay=replay)
    report |= _measures(trainer, net, seconds, cfg, new_tokens if rows or words else "off", len(rows), words, sample)
    (out / "finetune_report.json").write_text(json.dumps(report, indent=2))
    return report
