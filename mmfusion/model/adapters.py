"""Saved LoRA adapters (peft folders from `mmfusion finetune`) on a model for sampling: several at once,
each with a weight, switched or disabled without reloading the base, or fused into its weights.

The weighted combination is W + sum_i w_i * scaling_i * B_i A_i: every adapter is active at once in peft
(`set_adapter([...])`), each with its LoRA scale multiplied by its weight (`set_scale`), so the forward
pass adds the scaled deltas and fusing (`merge_and_unload`) adds exactly the same deltas to the weights.
(peft's `add_weighted_adapter(combination_type="linear")` would not: it mixes A and B matrices, which
brings in cross terms.) An adapter folder records the base it was trained on (`mmfusion_adapter.json`,
a fingerprint of the base's config and weights); it is refused by another base.

An adapter whose fine-tuning made new words whole tokens (`mmfusion finetune --new-tokens words`) holds
its grown `tokenizer.json`: loading it grows the model's text rows to match (their trained values come
from the adapter's token rows) and hands that tokenizer to the pipeline; deleting it shrinks them back.
Such an adapter, like any with token rows, is used alone at weight 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from mmfusion.errors import ConfigError, UserError
from mmfusion.generation.settings import SampleConfig
from mmfusion.tokenizers.text import TextTokenizer

RECORD = "mmfusion_adapter.json"
AdapterSpec = str | Path | tuple[str | Path, float]


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's config and of the first values of each of its tensors, rounded to bfloat16
    so a base cast to bfloat16 for sampling keeps its fingerprint. Take it before adapters are added."""
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        head = tensor.detach().flatten()[:64].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode() + head.numpy().tobytes())
    return digest.hexdigest()[:16]


def write_record(
    folder: str | Path, fingerprint: str, base: str, vocab_size: int | None = None, sample: dict | None = None
) -> None:
    """Note in an adapter folder which base (`base`, as the user named it, its fingerprint and its text
    vocabulary's size) it was trained on, and the changes to the base's sampling settings that the
    fine-tuned model samples with (`sample`: {"diffusion": {"cfg_scale": 2.0}}; `SampleConfig.changed`)."""
    record = {"base_model": base, "base_fingerprint": fingerprint, "base_vocab_size": vocab_size, "sample": sample}
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=2))


def check_base(folder: Path, fingerprint: str) -> dict:
    """Refuse an adapter trained on another base; an adapter without a record (older) only warns. Returns
    the record (empty without one)."""
    record = folder / RECORD
    if not record.is_file():
        warnings.warn(
            f"{folder} does not record the base model it was trained on (made before mmfusion recorded it): "
            "it cannot be checked against this model",
            stacklevel=3,
        )
        return {}
    saved = json.loads(record.read_text())
    if saved.get("base_fingerprint") != fingerprint:
        raise UserError(
            f"adapter {folder} was trained on another base model ({saved.get('base_model')}, fingerprint "
            f"{saved.get('base_fingerprint')}), not this one (fingerprint {fingerprint}): load it onto the "
            "model it was fine-tuned from"
        )
    return saved


def parse_spec(spec: AdapterSpec) -> tuple[Path, float]:
    """`PATH`, `PATH:WEIGHT` or (PATH, WEIGHT) -> (folder, weight); a plain path weighs 1.0."""
    if isinstance(spec, tuple):
        path, weight = spec
    elif isinstance(spec, Path) or ":" not in spec or Path(spec).exists():
        path, weight = spec, 1.0
    else:
        path, _, text = spec.rpartition(":")
        try:
            weight = float(text)
        except ValueError:
            raise UserError(
                f"adapter {spec!r}: the weight after ':' must be a number, e.g. --adapter {path}:0.7"
            ) from None
    if not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UserError(f"adapter {path}: its weight must be a finite number, got {weight!r}")
    return Path(path), float(weight)


def _adapter_folder(path: Path) -> Path:
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"{path} is not a LoRA adapter folder (no adapter_config.json); make one with `mmfusion finetune`"
        )
    return path


class Adapters:
    """The LoRA adapters loaded onto `model` (in place: `model` stays the object the pipeline samples with),
    by name, each with a weight; unmerged, so the base weights are untouched until `fuse`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.fingerprint = base_fingerprint(model)
        self.peft: PeftModel | None = None
        self.weights: dict[str, float] = {}  # the active combination
        self.enabled = True
        self.vocab_size = model.cfg.vocab_size  # the base's
        self.words: str | None = None  # the loaded adapter that grew the vocabulary, if any
        self.sample: dict[str, dict | None] = {}  # name -> the sampling changes its record names

    @property
    def names(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None else []

    def _name(self, path: Path, name: str | None) -> str:
        if name is not None:
            if not re.fullmatch(r"[\w-]+", name):
                raise UserError(f"adapter name {name!r}: use letters, digits, '_' and '-' only")
            if name in self.names:
                raise UserError(f"an adapter named {name!r} is already loaded: delete it first or choose another name")
            return name
        stem = re.sub(r"[^\w-]", "_", path.resolve().name) or "adapter"
        name, i = stem, 1
        while name in self.names:
            i += 1
            name = f"{stem}_{i}"
        return name

    def load(
        self, path: str | Path, name: str | None = None, weight: float = 1.0, tokenizer: TextTokenizer | None = None
    ) -> TextTokenizer | None:
        """Load a saved adapter under `name` (default: its folder's name) and add it, at `weight`, to the
        active combination. An adapter with new words grows the model's vocabulary, each new row starting
        from the mean of the rows that the base's `tokenizer` spelt it with, and returns its own tokenizer,
        which the caller must use while it is loaded."""
        path = _adapter_folder(Path(path))
        record = check_base(path, self.fingerprint)
        try:  # settings this version lacks are refused before anything loads
            SampleConfig().changed(record.get("sample"))
        except ConfigError as e:
            raise e.within(f"{path / RECORD}: sample") from None
        grown = (path / "tokenizer.json").is_file()
        if (grown or self.words) and self.names:
            raise UserError(
                f"adapter {self.words or path} adds words to the text vocabulary, so it is used alone, not with "
                f"other adapters (loaded: {', '.join(self.names)})"
            )
        name = self._name(path, name)
        words = self._grow(path, name, weight, tokenizer, record.get("base_vocab_size")) if grown else None
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
        except Exception:
            if words is not None:
                self.model.resize_vocab(self.vocab_size)
                self.words = None
            raise
        self.sample[name] = record.get("sample")
        self.set({**self.weights, name: weight})
        return words

    def sampling_changes(self) -> dict | None:
        """The sampling changes of the one active adapter, when it is enabled and at weight 1 (the model its
        fine-tuning made); None for the base, a mix or a weighted adapter."""
        if self.peft is None or not self.enabled or list(self.weights.values()) != [1.0]:
            return None
        return self.sample.get(next(iter(self.weights)))

    def _grow(
        self, path: Path, name: str, weight: float, tokenizer: TextTokenizer | None, trained_on: int | None
    ) -> TextTokenizer:
        """The adapter's tokenizer, with the model's vocabulary grown to match (the adapter's checks first;
        `trained_on`: the vocabulary size its record names)."""
        if tokenizer is None:
            raise UserError(f"adapter {path} adds words to the vocabulary: load it with MMFusion.load_adapter")
        if weight != 1.0:
            raise UserError(f"adapter {path} adds words to the text vocabulary: use it alone at weight 1")
        if trained_on not in (None, self.model.cfg.vocab_size):
            raise UserError(
                f"adapter {path} was trained on a vocabulary of {trained_on} tokens, this model has "
                f"{self.model.cfg.vocab_size} (an adapter with new words fused into it?): load it onto its own base"
            )
        if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UserError(f"adapter {path} has no adapter weights (adapter_model.safetensors)")
        words = TextTokenizer.from_file(path, tokenizer.special, tokenizer.max_len)
        new = [words.tokenizer.id_to_token(i) for i in range(self.vocab_size, len(words))]
        self.model.resize_vocab([tokenizer.pieces(w) for w in new])
        self.words = name
        return words

    def set(self, weights: dict[str, float]) -> None:
        """Make `weights` (name -> weight) the active combination; the other loaded adapters rest."""
        unknown = [n for n in weights if n not in self.names]
        if unknown or not weights:
            loaded = ", ".join(self.names) or "none"
            raise UserError(
                f"no adapter named {unknown[0]!r} is loaded (loaded: {loaded})" if unknown else "no adapter"
            )
        for name, weight in weights.items():
            parse_spec(("", weight))  # a finite number
            config = self.peft.peft_config[name]
            saved = list(config.modules_to_save or []) + list(getattr(config, "trainable_token_indices", None) or [])
            if saved and (len(weights) > 1 or weight != 1.0):
                raise UserError(
                    f"adapter {name!r} trains whole modules or token rows ({', '.join(saved)}), which cannot be "
                    "weighted or combined with other adapters: use it alone at weight 1"
                )
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                for name, weight in weights.items():
                    module.set_scale(name, weight)
        self.peft.base_model.set_adapter(list(weights), inference_mode=True)
        self.weights = dict(weights)
        self.enable(self.enabled)

    def enable(self, on: bool = True) -> None:
        """Turn the adapters on (the active combination) or off (the base's own outputs)."""
        if self.peft is not None:
            (self.peft.base_model.enable_adapter_layers if on else self.peft.base_model.disable_adapter_layers)()
        self.enabled = on
        # disabled, a base grown for new words emits only its own ids (the pipeline reads with its own tokenizer)
        self.model.emit_vocab = self.vocab_size if self.words and not on else None
        self.model.requires_grad_(False)  # peft marks active adapters trainable again; here they only sample

    def delete(self, name: str) -> None:
        if name not in self.names:
            raise UserError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        others = [n for n in self.names if n != name]
        self.sample.pop(name, None)
        if not others:
            self.peft.base_model.unload()
            self.peft, self.weights = None, {}
            if self.words:  # back to the base's vocabulary
                self.model.resize_vocab(self.vocab_size)
                self.words, self.model.emit_vocab = None, None
            return
        self.set({n: w for n, w in self.weights.items() if n != name} or {others[0]: 1.0})
        self.peft.base_model.delete_adapter(name)

    def fuse(self) -> None:
        """Add the active combination (nothing if disabled) to the base weights and remove the adapters."""
        if self.peft is None:
            return
        self.peft.base_model.merge_and_unload() if self.enabled else self.peft.base_model.unload()
        self.peft, self.weights, self.sample = None, {}, {}
        if self.words and not self.enabled:  # the base alone: its own vocabulary
            self.model.resize_vocab(self.vocab_size)
        # fused, the model keeps the new words (and the caller their tokenizer) as its own
        self.words, self.vocab_size, self.enabled = None, self.model.cfg.vocab_size, True
        self.model.emit_vocab = None


def merge_adapters(model: nn.Module, adapters: Sequence[AdapterSpec]) -> nn.Module:
    """Fold saved adapters into the weights of `model` (the sum of their deltas, each times its weight).
    An adapter with new words needs its tokenizer swapped in as well: `MMFusion.load_adapters` does both."""
    loaded = Adapters(model)
    for spec in adapters:
        path, weight = parse_spec(spec)
        loaded.load(path, weight=weight)
    loaded.fuse()
    return model
