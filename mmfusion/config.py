"""Run configuration: typed dataclasses, loaded from YAML with dotted overrides and strict checks.

Every bad setting (an unknown key, a value of the wrong type or out of range) is one ConfigError whose
message starts with the dotted key: `train.lr: must be of type float, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import ConfigError, UserError, check
from mmfusion.generation.settings import SampleConfig
from mmfusion.model.config import ModelConfig
from mmfusion.tokenizers.config import ImageTokenizerConfig


@dataclass(frozen=True)
class ObjectiveConfig:
    condition: str = "text"  # text (T2I + captioning) | class (class-conditional generation)
    t2i_fraction: float = 0.9  # share of samples in T2I order; the rest are in caption order
    caption_dropout: float = 0.1  # T2I samples whose caption is dropped (unconditional stream for CFG)
    text_loss_weight: float = 0.01  # text loss x this, in caption order
    caption_image_loss_weight: float = 1.0  # image loss of caption-order samples (unconditional)
    # AR steps of the image in caption-order samples. 1: one group of clean tokens that see each other,
    # the layout the text reads at inference (captioning gives the image as one clean group); null: drawn
    # as for T2I (gamma), so the text mostly reads clean tokens under the block-causal mask of S groups
    caption_ar_steps: int | None = 1
    baseline: str = "causalfusion"  # causalfusion | transfusion (one AR step, text reads the noisy image)
    bit_flip: float = 0.0  # binary codes: Infinity's bitwise self-correction, input bits flipped at this rate
    # pack samples into rows of this many tokens (the mask keeps them apart) instead of padding each to
    # the longest; 0 turns packing off
    pack_length: int = 0

    def caption_steps(self, n_tokens: int) -> int | None:
        """AR steps of a caption-order image of `n_tokens` (`caption_ar_steps`, at most its tokens); None
        draws them as for T2I."""
        return None if self.caption_ar_steps is None else min(self.caption_ar_steps, n_tokens)

    def __post_init__(self) -> None:
        check(
            [
                (
                    self.condition in CONDITIONS,
                    "condition",
                    f"must be one of {', '.join(CONDITIONS)}, got {self.condition!r}",
                ),
                (
                    self.baseline in BASELINES,
                    "baseline",
                    f"must be one of {', '.join(BASELINES)}, got {self.baseline!r}",
                ),
                (
                    self.caption_ar_steps is None or self.caption_ar_steps >= 1,
                    "caption_ar_steps",
                    f"must be at least 1 (or null), got {self.caption_ar_steps}",
                ),
            ]
        )


CONDITIONS = ("text", "class")
RESIZE_POLICIES = ("squash", "center_crop", "pad")  # mmfusion.image_io.RESIZERS
BASELINES = ("causalfusion", "transfusion")


@dataclass(frozen=True)
class DataConfig:
    # "shapes" (rendered on the fly into the run folder), a local data set (saved DatasetDict, imagefolder
    # with metadata.jsonl, Karpathy / COCO JSON, parquet / json / jsonl / csv file or folder of them) or a
    # Hugging Face hub name owner/name
    source: str = "shapes"
    # folder the image paths of a COCO / Karpathy JSON, a table or a saved set's path column are relative
    # to (default: the folder of the JSON, the table or the saved set)
    image_root: str | None = None
    # column of images or image paths; None: the first of image, img, jpg, png, file_name, image_path,
    # filepath, path that the data has
    image_column: str | None = None
    # column of captions (a string, a list of strings or Karpathy's [{"raw": ...}]); None: the first of
    # captions, caption, text, sentences, raw, txt, prompt, description that the data has
    caption_column: str | None = None
    # how an image becomes the model's square input: squash (resize both sides, the aspect ratio is lost),
    # center_crop (short side to the size, the centre cut out) or pad (long side to the size, white margins)
    resize: str = "squash"
    shapes_n: int = 20000  # images the built-in shapes set renders (its train split; test and validation are fixed)
    shapes_seed: int = 0  # seed of the shapes rendering
    shapes_pair_fraction: float = 0.5  # share of shapes scenes with two objects and a relation (the rest have one)
    train_split: str = "train"  # split of the data set to train on
    val_split: str = "validation"  # a held-out split, not trained on (the demo and `eval shapes` judge on test)
    batch_size: int = 64  # samples per step in each process (Lightning's convention)
    # when set, the samples per step of all processes together: each takes global / processes (which
    # must divide it), and batch_size is ignored. A run then trains the same recipe on any number of
    # processes (the demo's 128 as two processes of 64 or one of 128).
    global_batch_size: int | None = None
    num_workers: int = 0  # DataLoader worker processes (0: batches made in the training process)
    tokenizer: str | None = None  # a tokenizer.json; None trains a byte-level BPE on the captions
    vocab_size: int = 512  # size of the byte-level BPE trained on the captions when no tokenizer is given
    max_text_len: int = 35  # captions are cut to this many tokens
    hflip: bool = False  # horizontal flip augmentation (never for shapes: it would swap left / right)
    # decode the training split once into tensors in memory (images as uint8, captions as token ids)
    # when its images fit in this many MB; above it (or with 0) every row is read and decoded anew
    # on every pass
    cache_mb: int = 1024

    def __post_init__(self) -> None:
        check(
            [
                (
                    self.resize in RESIZE_POLICIES,
                    "resize",
                    f"must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}",
                )
            ]
        )

    def process_batch(self, world_size: int) -> int:
        """Samples per step in each of `world_size` processes."""
        if self.global_batch_size is None:
            return self.batch_size
        if self.global_batch_size < 1 or self.global_batch_size % world_size:
            raise ConfigError(
                "data.global_batch_size",
                f"{self.global_batch_size} does not split into {world_size} equal process batches: "
                f"make it a positive multiple of {world_size}",
            )
        return self.global_batch_size // world_size


LR_SCHEDULES = ("constant", "cosine", "wsd")


def check_lr_schedule(schedule: str, decay_fraction: float) -> None:
    """ConfigError unless `schedule` is one of LR_SCHEDULES and `decay_fraction` is in (0, 1]."""
    check(
        [
            (schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}"),
            (0 < decay_fraction <= 1, "lr_decay_fraction", f"must be in (0, 1], got {decay_fraction}"),
        ]
    )


# Lightning's precision names (and their short forms) and the strategies mmfusion sets up
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "bf16", "16", "64")
STRATEGIES = ("auto", "ddp", "fsdp")
LOGGERS = ("csv", "tensorboard", "wandb")


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/mmfusion"  # the run folder: checkpoints, logs, the model folder
    seed: int = 0  # seed of the weights, the data order and every random draw of the objective
    max_steps: int = 1000  # optimizer steps to train (the run also stops at max_time_minutes)
    max_time_minutes: float | None = None  # stop after this wall time, whatever max_steps says
    lr: float = 1e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # floor of the cosine and wsd schedules (x lr)
    weight_decay: float = 0.0  # AdamW weight decay (not on norms, biases and embeddings)
    # learning rate of LoRA's B matrices over lr (LoRA+, Hayou et al. 2024; 1: plain LoRA)
    loraplus_lr_ratio: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 100  # linear warm-up of the learning rate from 0
    # constant | cosine | wsd (warmup-stable-decay: constant, then linear down to min_lr_ratio over the
    # last lr_decay_fraction of the run), all after linear warmup. The run's end is max_steps or, if
    # it comes first, max_time_minutes: a run cut by its time budget still completes its decay
    lr_schedule: str = "constant"
    lr_decay_fraction: float = 0.2  # share of the run the wsd schedule decays over
    grad_clip: float = 1.0  # gradients clipped to this global norm (0: off)
    ema_decay: float = 0.999  # EMA of the weights for sampling (0: sample with the live weights)
    precision: str = "auto"  # auto (measure bf16 vs fp32 matmul speed here) | 32-true | bf16-mixed
    accumulate_grad_batches: int = 1  # batches whose gradients add up to one optimizer step
    accelerator: str = "auto"  # auto | cpu | gpu (Lightning's accelerator)
    devices: int | str = 1  # processes (devices) per node, or a list of GPU ids
    num_nodes: int = 1  # machines of a multi-node run (SLURM or torchrun)
    strategy: str = "auto"  # auto | ddp | fsdp
    activation_checkpointing: bool = False  # recompute each block's activations in the backward instead of keeping them
    # torch.compile the transformer blocks, as one graph (block by block under FSDP), for faster steps
    # after some seconds of compiling (docs/BENCHMARKS.md); inductor needs a C++ compiler on CPU,
    # skipped with a message where there is none
    compile: bool = False
    # with `compile`, the whole training step as one graph: embeddings, mask, transformer, output heads and
    # losses (`JointObjective.compile`), which fuse across the transformer's ends; faster steps on small
    # models, for a longer compile at the start of a run (docs/BENCHMARKS.md). The demo's default. Not
    # under FSDP, which compiles block by block
    compile_step: bool = False
    log_every_n_steps: int = 25  # steps between logged losses (csv or TensorBoard)
    checkpoint_every_n_steps: int = 500  # steps between checkpoints (RUN/checkpoints/last.ckpt, for --resume)
    keep_all_checkpoints: bool = False  # keep one checkpoint per interval instead of only the last
    logger: str = "csv"  # csv | tensorboard | wandb (the optional wandb package; WANDB_MODE=offline needs no network)
    # steps between validation checks: the loss on data.val_split and, with a tensorboard or wandb logger,
    # samples for the captions of validation images and captions of those images; 0: no validation
    val_every_n_steps: int = 0
    val_batches: int = 2  # batches of the validation split whose loss each check averages
    # validation images per check whose first caption is sampled as a prompt and which are captioned, for the
    # logger's samples; 0: none
    val_samples: int = 4
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row (each is skipped)
    init_from_llm: str | None = None  # a Hugging Face LLaMA / Qwen2 / Qwen3 folder: backbone, text weights, tokenizer

    def __post_init__(self) -> None:
        check_lr_schedule(self.lr_schedule, self.lr_decay_fraction)
        minutes = self.max_time_minutes
        check(
            [
                (self.logger in LOGGERS, "logger", f"must be one of {', '.join(LOGGERS)}, got {self.logger!r}"),
                (
                    self.val_every_n_steps >= 0,
                    "val_every_n_steps",
                    f"must not be negative, got {self.val_every_n_steps}",
                ),
                (self.val_batches >= 1, "val_batches", f"must be at least 1, got {self.val_batches}"),
                (self.val_samples >= 0, "val_samples", f"must not be negative, got {self.val_samples}"),
                (  # 0 would mean no limit at all
                    minutes is None or minutes > 0,
                    "max_time_minutes",
                    f"must be positive (or null for no time limit), got {minutes}",
                ),
                (self.max_steps >= 1, "max_steps", f"must be at least 1, got {self.max_steps}"),
                (
                    str(self.precision) in PRECISIONS,
                    "precision",
                    f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
                ),
                (
                    self.strategy in STRATEGIES,
                    "strategy",
                    f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
                ),
            ]
        )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("small"))
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        check(
            [
                (
                    self.objective.condition != "class" or self.model.num_classes > 0,
                    "objective.condition",
                    "class needs model.num_classes > 0 (12 for the shapes classes)",
                ),
                (
                    self.model.shuffle == 1 or self.image.kind == "vq",
                    "model.shuffle",
                    f"{self.model.shuffle} fuses discrete image codes: it needs image.kind=vq and image.path "
                    f"(a VQ model, `mmfusion vq train`), not image.kind={self.image.kind}",
                ),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_data_path(cfg: RunConfig, encoded: bool) -> None:
    """Refuse settings that the run's data path would ignore or get wrong (`encoded`: the data holds
    tokens made ahead of time by `mmfusion data encode`)."""
    flip = cfg.data.hflip
    check(
        [
            (
                not (flip and encoded),
                "data.hflip",
                "has no effect on tokens encoded ahead of time (`mmfusion data encode`), which are never "
                "flipped: set it false, or train on the images",
            ),
            (
                not (flip and cfg.data.source == "shapes"),
                "data.hflip",
                "would swap left and right in the relations of the shapes captions: set it false",
            ),
        ]
    )


# loading ------------------------------------------------------------------------------------
def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except UserError as e:
                errors.append(e)
        raise errors[-1]
    if tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(tp)):
            return tuple(_check_type(key, v, a) for v, a in zip(value, typing.get_args(tp)))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, f"must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """The settings dataclass `cls` from a mapping, checked key by key; `prefix` ("sample.") names the
    section in errors."""
    section = prefix.rstrip(".")
    if cls is SampleConfig:  # a flat `sample:` section of before its per-sampler parts
        data = SampleConfig.nest(data)
    if not isinstance(data, dict):
        raise ConfigError(section, f"must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - ({"preset"} if cls is ModelConfig else set()))
    if unknown:
        raise ConfigError(
            prefix + unknown[0], f"unknown key; the keys of {section or 'a config'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        if name == "preset":
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, tp)
    try:
        if cls is ModelConfig:
            return ModelConfig.from_name(data.get("preset", "small"), **kwargs)
        return cls(**kwargs)
    except ConfigError as err:
        raise err.within(section) from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "model.preset=tiny"]` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value, e.g. train.max_steps=200")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (or defaults) plus `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    extra = parse_overrides(overrides or [])
    for tree in (data, extra):  # each in today's form before they merge, so an override always wins
        if "sample" in tree:
            tree["sample"] = SampleConfig.nest(tree["sample"])
    data = _merge(data, extra)
    given, merged = extra.get("data", {}), data.get("data", {})
    if (
        isinstance(given, dict)
        and isinstance(merged, dict)
        and "batch_size" in given
        and "global_batch_size" not in given
        and merged.get("global_batch_size") is not None
    ):
        raise ConfigError(
            "data.batch_size",
            f"{given['batch_size']} would have no effect: this config sets data.global_batch_size="
            f"{merged['global_batch_size']}, the samples per step of all processes together; override that "
            "instead (or add data.global_batch_size=null for a per-process batch)",
        )
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return build_section(RunConfig, data)
