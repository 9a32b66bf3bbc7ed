"""`MMFusion`: a trained model with its tokenizers, for generation, captioning and editing.

A model folder holds `config.json`, `model.safetensors` (the EMA weights), `tokenizer.json` and a model
card (README.md); it is separate from Lightning's resume checkpoints. It loads from a folder or, by its
id, from the Hugging Face Hub (mmfusion.hub).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from mmfusion.config import build_section
from mmfusion.devices import inference_device, inference_dtype
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.errors import ConfigError, UserError
from mmfusion.generation.caption import CaptionDecoder
from mmfusion.generation.common import batches
from mmfusion.generation.diffusion import NextTokenDiffusionSampler
from mmfusion.generation.rerank import redraw_error
from mmfusion.generation.settings import CaptionSampling, DiffusionSampling, SampleConfig, TokenSampling, with_changes
from mmfusion.generation.tokens import ARImageSampler
from mmfusion.hub import (
    absolute_local_path,
    check_model_folder,
    config_header,
    data_name,
    image_tokenizer_path,
    read_config,
    resolve_model,
    write_atomic,
    write_model_card,
)
from mmfusion.image_io import to_pil, to_tensor
from mmfusion.model.adapters import Adapters, AdapterSpec, parse_spec
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.prompts import Prompts
from mmfusion.model.transformer import compile_for_inference
from mmfusion.runtime import bf16_native, tune_malloc
from mmfusion.tokenizers.build import build_image_tokenizer
from mmfusion.tokenizers.config import ImageTokenizerConfig
from mmfusion.tokenizers.text import TextTokenizer


class MMFusion:
    def __init__(
        self,
        model: MMFusionModel,
        text_tokenizer: TextTokenizer,
        image: ImageTokenizerConfig,
        diffusion: DiffusionConfig,
        sample: SampleConfig = SampleConfig(),
        condition: str = "text",
        image_tokenizer: Any = None,
        class_names: list[str] | None = None,
        objective: dict[str, Any] | None = None,
        resize: str = "squash",
        training_data: str | None = None,
    ) -> None:
        tune_malloc()  # as the CLI does: batched captions free and refault large blocks otherwise
        self.model = model.eval()
        self.text_tokenizer = text_tokenizer
        self.image_cfg = image
        self.image_tokenizer = (image_tokenizer or build_image_tokenizer(image)).to(model.device)
        self.diffusion = diffusion
        self.sampling = sample  # the default settings of each sampler, saved with the model
        self.condition = condition
        self.class_names = list(class_names or [])
        self.objective = dict(objective or {})  # the training objective, reused by `mmfusion finetune`
        self.resize = resize  # how an image becomes the model's square input: its training's data.resize
        self.training_data = training_data  # the data's name for the model card (mmfusion.hub.data_name)
        t = text_tokenizer
        self.prompts = Prompts(model.cfg, t.bos_id, t.boi_id)
        self._adapters: Adapters | None = None  # LoRA adapters loaded and not fused (see `load_adapter`)
        # (the base's, the adapter's) while an adapter with new words is loaded
        self._tokenizers: tuple[TextTokenizer, TextTokenizer] | None = None
        self._base_sampling: SampleConfig | None = None  # the base's settings while adapters are loaded

    # files --------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: Any) -> MMFusion:
        """From a trained MMFusionModule; sampling uses its EMA weights."""
        cfg = module.cfg
        return cls(
            module.sampling_model,
            module.text_tokenizer,
            module.image_tokenizer.cfg,
            cfg.diffusion,
            cfg.sample,
            cfg.objective.condition,
            module.image_tokenizer,
            module.class_names,
            dataclasses.asdict(cfg.objective),
            cfg.data.resize,
            data_name(cfg.data.source),
        )

    def save_pretrained(self, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write the model folder: config.json, model.safetensors, tokenizer.json and the model card
        README.md, which shows `metrics` (name -> figure, or nested dicts of them) when given. A folder
        with its VAE / VQ model in `image_tokenizer/` (see `image_tokenizer_path`) is ready for the hub."""
        if self._adapters is not None and self._adapters.model is self.model and self._adapters.names:
            raise UserError("adapters are loaded but not fused: call fuse_adapters() before save_pretrained")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            **config_header(),
            "model": self.model.cfg.to_dict(),
            "image": absolute_local_path(self.image_cfg.to_dict()),
            "diffusion": self.diffusion.to_dict(),
            "sample": dataclasses.asdict(self.sampling),
            "condition": self.condition,
            "class_names": self.class_names,
            "objective": self.objective,
            "special_tokens": self.text_tokenizer.special,
            "max_text_len": self.text_tokenizer.max_len,
            "resize": self.resize,
            "training_data": self.training_data,
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        if self.model.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        write_atomic(folder / "model.safetensors", lambda p: save_file(state, str(p)))
        write_atomic(folder / "tokenizer.json", lambda p: self.text_tokenizer.tokenizer.save(str(p)))
        write_atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
        write_model_card(folder, metrics)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "auto",
        adapters: list[AdapterSpec] | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> MMFusion:
        """Load a model folder, or a model on the Hugging Face Hub by its id ("owner/name"), onto `device`
        ("cpu", "cuda", "cuda:1", or "auto": a GPU when there is one). A string naming an existing folder
        is that folder; otherwise it is a hub id, fetched at `revision` (branch, tag or commit hash) into
        the hub's cache (`cache_dir`, `token` as huggingface_hub takes them); offline (HF_HUB_OFFLINE=1
        or `local_files_only`) it is read from the cache only. `adapters` (LoRA folders, each a path,
        "path:weight" or (path, weight); weight 1 by default) are fused into the float32 weights, as the sum
        of their weighted deltas (see `load_adapter` to keep them apart and switch them); `dtype` bfloat16
        then casts them for inference (see `to_dtype`). The samplers keep their state (noise, decoded ids)
        on the CPU, seeded there, and move each batch to the model's device, so an image depends on its
        seed, not on where it was sampled (up to the device's arithmetic)."""
        device = inference_device(device)
        folder = check_model_folder(resolve_model(folder, revision, cache_dir, token, local_files_only))
        config = read_config(folder)
        tok = TextTokenizer.from_file(
            folder / "tokenizer.json", special=config.get("special_tokens"), max_len=config.get("max_text_len", 35)
        )
        image = ImageTokenizerConfig(**config["image"])
        if image.kind in ("vae", "vq"):
            image = dataclasses.replace(image, path=image_tokenizer_path(folder, image.path))
        pipe = cls(
            _load_model(folder, ModelConfig.from_dict(config["model"])).to(device),
            tok,
            image,
            DiffusionConfig(**config["diffusion"]),
            build_section(SampleConfig, config.get("sample", {}), "sample."),
            config.get("condition", "text"),
            class_names=config.get("class_names"),
            objective=config.get("objective"),
            resize=config.get("resize", "squash"),
            training_data=config.get("training_data"),
        )
        pipe = pipe.load_adapters(adapters) if adapters else pipe
        return pipe.to_dtype(dtype) if dtype is not None else pipe

    def to(self, device: str | torch.device) -> MMFusion:
        """Move the model and the image tokenizer (VAE / VQ model) to `device` (see `from_pretrained`)."""
        device = inference_device(device)
        self.model.to(device)
        self.image_tokenizer.to(device)
        return self

    def to_dtype(self, dtype: str | torch.dtype) -> MMFusion:
        """Sample and caption with weights in `dtype` (float32 or bfloat16). bfloat16 halves the memory of
        the backbone's weights and of the KV cache; on CPUs that multiply bf16 natively (AMX, AVX512-BF16)
        it samples large models faster, while small passes (tens of rows of a 128-wide model) gain nothing
        or lose (docs/BENCHMARKS.md). The rotary frequencies and, with `fp32_head`, the output heads
        stay float32, and the samplers keep their own state (noisy tokens, logits) in float32."""
        dtype = inference_dtype(dtype)
        if dtype == torch.bfloat16 and self.model.device.type == "cpu":
            native, bf16, fp32 = bf16_native()
            if not native:
                warnings.warn(
                    f"this CPU has no native bf16 matmul ({bf16:.0f} against {fp32:.0f} GFLOP/s in float32): "
                    "sampling in bfloat16 will be much slower than in float32",
                    stacklevel=2,
                )
        self.model.to_dtype(dtype)
        return self

    def compile(self, warm_up: bool = False) -> MMFusion:
        """torch.compile the transformer in place, for faster sampling and captioning once compiled:
        a pass (a prompt, a denoising step, a decoded token) runs as fused kernels instead of a few
        hundred small operations. Shapes are dynamic (batch, sequence and cache length), so a handful of
        graphs serve every size; each compiles on its first use (inductor keeps them in its cache on disk
        for later processes; the times are in docs/BENCHMARKS.md). In float32 the outputs equal the
        eager model's up to float rounding; in bfloat16 the fused kernels round differently, and the
        sampling chain carries that far enough that an image drawn from a seed can differ. For a process
        that samples a lot, such as a server (`mmfusion serve --compile`). On CPU it needs a C++
        compiler (g++); without one the model stays eager, with a message. `warm_up` compiles at once,
        on throwaway images and captions at batches of 1 and 2, rather than on the first requests."""
        if compile_for_inference(self.model) and warm_up:
            condition = "a" if self.condition == "text" else 0
            quick = {} if self.model.cfg.discrete else {"steps": 2}
            for n in (1, 2):
                images = self.generate([condition] * n, **quick)
                if self.condition == "text":
                    self.caption(images)
        return self

    def load_adapters(self, adapters: list[AdapterSpec]) -> MMFusion:
        """Fuse one or more LoRA adapters (folders from `mmfusion finetune`; a path, "path:weight" or
        (path, weight)) into the weights: W + sum of weight x delta. `from_pretrained(adapters=...)` calls it."""
        for spec in adapters:
            path, weight = parse_spec(spec)
            self.load_adapter(path, weight=weight)
        return self.fuse_adapters()

    # adapters kept apart (as peft's and diffusers' LoRA loading) --------------------------
    def _adapter_set(self) -> Adapters:
        if self._adapters is None or self._adapters.model is not self.model:
            self._adapters = Adapters(self.model)
        return self._adapters

    def load_adapter(self, path: str | Path, name: str | None = None, weight: float = 1.0) -> MMFusion:
        """Load a LoRA adapter (a folder from `mmfusion finetune`) under `name` (default: the folder's name)
        and add it at `weight` to the active adapters, unmerged: the base weights stay as they are, so
        `set_adapters`, `disable_adapters` and `delete_adapter` switch without reloading. An adapter
        trained on another base model is refused. An adapter with new words (`mmfusion finetune --new-tokens
        words`) brings its own tokenizer, in use until it is deleted, and is used alone. The sampling settings
        its fine-tuning recorded (a guidance scale) are the model's while it is the one active adapter at
        weight 1, and stay when it is fused."""
        self._base_sampling = self._base_sampling or self.sampling
        try:
            words = self._adapter_set().load(path, name, weight, self.text_tokenizer)
        except Exception:
            self._follow_adapters()  # as before the call
            raise
        if words is not None:
            self._tokenizers = (self.text_tokenizer, words)
        self._follow_adapters()
        return self

    def _follow_adapters(self, fused: dict | None = None) -> None:
        """The sampling settings and the tokenizer that go with the active adapters; `fused`: the sampling
        changes of what was just fused in, which the model keeps."""
        if self._base_sampling is not None:
            ad = self._adapters
            live = ad is not None and ad.peft is not None
            self.sampling = self._base_sampling.changed(ad.sampling_changes() if live else fused)
            self._base_sampling = self._base_sampling if live else None
        self._tokenizer_follows_adapters()

    def _tokenizer_follows_adapters(self) -> None:
        """With an adapter with new words: its tokenizer while it is enabled, the base's while disabled or once
        deleted; fused, its tokenizer stays."""
        if self._tokenizers is None:
            return
        base, words = self._tokenizers
        ad = self._adapters
        if ad is not None and ad.words is not None:
            self.text_tokenizer = words if ad.enabled else base
            return
        self.text_tokenizer = base if self.model.cfg.vocab_size == len(base) else words
        self._tokenizers = None

    def set_adapters(
        self, adapters: str | list[str] | dict[str, float], weights: list[float] | None = None
    ) -> MMFusion:
        """The active adapters and their weights: {"a": 0.7, "b": 0.3}, or names with `weights` (default 1
        each); the others loaded stay loaded but rest. Outputs follow W + sum of weight x delta."""
        names = [adapters] if isinstance(adapters, str) else list(adapters)
        if not isinstance(adapters, dict):
            weights = [1.0] * len(names) if weights is None else list(weights)
            if len(weights) != len(names):
                raise UserError(f"{len(names)} adapters and {len(weights)} weights: give one weight each")
            adapters = dict(zip(names, weights))
        self._adapter_set().set(dict(adapters))
        self._follow_adapters()
        return self

    @property
    def adapter_weights(self) -> dict[str, float]:
        """The active adapters (name -> weight), empty when none is loaded or they are disabled."""
        ad = self._adapters
        return dict(ad.weights) if ad is not None and ad.model is self.model and ad.enabled else {}

    def disable_adapters(self) -> MMFusion:
        """Sample with the base model alone; `enable_adapters` brings the active adapters back."""
        self._adapter_set().enable(False)
        self._follow_adapters()
        return self

    def enable_adapters(self) -> MMFusion:
        self._adapter_set().enable(True)
        self._follow_adapters()
        return self

    def delete_adapter(self, name: str) -> MMFusion:
        """Unload one adapter; the base weights are untouched."""
        self._adapter_set().delete(name)
        self._follow_adapters()
        return self

    def fuse_adapters(self) -> MMFusion:
        """Add the active weighted combination of adapters to the weights and unload them (the base alone if
        they are disabled): the model is plain again, and `save_pretrained` writes an ordinary model folder."""
        ad = self._adapter_set()
        fused = ad.sampling_changes()
        ad.fuse()
        self._follow_adapters(fused)
        return self

    # generation ---------------------------------------------------------------------------
    def class_index(self, prompt: str | int) -> int:
        """A class index from an int, a digit string or a class name (`red circle`, `a red circle`)."""
        if isinstance(prompt, int) or str(prompt).strip().isdigit():
            index = int(prompt)
        else:
            name = str(prompt).strip().lower().removeprefix("a ").removeprefix("an ")
            if name not in self.class_names:
                raise UserError(f"unknown class {prompt!r}; this model knows: {', '.join(self.class_names)}")
            index = self.class_names.index(name)
        if not 0 <= index < self.model.cfg.num_classes:
            raise UserError(f"class index {index} out of range 0..{self.model.cfg.num_classes - 1}")
        return index

    def _condition(self, prompt: str | int, negative: str | int | None = None) -> tuple[list[int], list[int]]:
        """The prefixes of the conditional stream and of the one guidance steers away from: the
        unconditional prefix, or the negative prompt's (None or "" is no negative prompt)."""
        if self.condition == "class":
            away = None if negative in (None, "") else self.class_index(negative)
            return self.prompts.classes(self.class_index(prompt)), self.prompts.classes(away)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("prompt is empty: give a text prompt such as 'a red circle'")
        away = self.text_tokenizer.encode(negative) if isinstance(negative, str) and negative.strip() else None
        return self.prompts.text(self.text_tokenizer.encode(prompt)), self.prompts.text(away)

    def image_settings(
        self, settings: DiffusionSampling | TokenSampling | None = None, **changes: Any
    ) -> DiffusionSampling | TokenSampling:
        """The settings this model's image sampler takes: `DiffusionSampling` for CausalFusion,
        `TokenSampling` for Token-Shuffle. `settings` (default: the model's own, saved with it) with
        `changes` made by name, None leaving a setting as it is; a setting of the other sampler is an
        error that lists this one's."""
        if self.model.cfg.discrete:
            kind, base, what = TokenSampling, self.sampling.tokens, "Token-Shuffle's autoregressive sampling"
        else:
            kind, base, what = DiffusionSampling, self.sampling.diffusion, "CausalFusion's diffusion sampling"
        if settings is not None and not isinstance(settings, kind):
            raise ConfigError("settings", f"this model samples with {kind.__name__}, got {type(settings).__name__}")
        return with_changes(settings or base, what, **changes)

    def caption_settings(self, settings: CaptionSampling | None = None, **changes: Any) -> CaptionSampling:
        """`settings` (default: the model's caption settings) with `changes` made by name."""
        return with_changes(settings or self.sampling.caption, "caption decoding", **changes)

    def generate_tokens(
        self,
        prompts: list[str | int],
        seeds: list[int],
        settings: DiffusionSampling | TokenSampling,
        use_cache: bool = True,
        progress: bool = False,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        negative_prompts: list[str | int | None] | None = None,
    ) -> torch.Tensor:
        """Image tokens for `prompts`, one image per seed, sampled with `settings` (`image_settings`);
        `known` tokens where `known_mask` is set are given, not generated (editing); guidance steers away
        from each image's negative prompt where one is given, else from the unconditional stream."""
        negatives = negative_prompts or [None] * len(prompts)
        conds, unconds = zip(*(self._condition(p, n) for p, n in zip(prompts, negatives)))
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        if isinstance(settings, TokenSampling):  # Token-Shuffle: autoregressive codes
            if known is not None:
                raise UserError("editing works on the continuous (CausalFusion) image path only")
            return ARImageSampler(self.model, settings)(list(conds), list(unconds), gens, use_cache=use_cache)
        sampler = NextTokenDiffusionSampler(self.model, self.diffusion, settings)
        return sampler(
            list(conds), list(unconds), gens, known=known, known_mask=known_mask, use_cache=use_cache, progress=progress
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: str | int | list[str | int],
        num_images: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = False,
        seeds: list[int] | None = None,
        settings: DiffusionSampling | TokenSampling | None = None,
        negative_prompt: str | int | list[str | int] | None = None,
        **changes: Any,
    ) -> list[Any]:
        """PIL images: `num_images` per prompt; image j of prompt i uses seed `seed + i * num_images + j`
        (or `seeds[i]`, one image per prompt, when `seeds` is given). An image depends only on its
        prompt, seed and settings, never on the batch it was sampled in. `negative_prompt` (one for all,
        or one per prompt) is what guidance steers away from instead of the unconditional stream.

        The sampler's settings are `settings` (default: the model's own) with `changes` by name, as in
        `pipe.generate("a red circle", ar_steps=4, order="raster")`: for CausalFusion the fields of
        `DiffusionSampling` (ar_steps, order, sampler, steps, cfg_scale, cfg_interval, cfg_until_step,
        eta), for Token-Shuffle those of `TokenSampling` (temperature, top_k, top_p, cfg_scale,
        cfg_schedule).
        """
        settings = self.image_settings(settings, **changes)
        prompts = [prompts] if isinstance(prompts, (str, int)) else list(prompts)
        if num_images < 1 or batch_size < 1:
            raise UserError(f"num_images and batch_size must be at least 1, got {num_images} and {batch_size}")
        negatives = _per_prompt(negative_prompt, len(prompts), "negative prompts")
        if seeds is not None:
            if len(seeds) != len(prompts):
                raise UserError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
            jobs = list(zip(prompts, negatives, seeds))
        else:
            jobs = [
                (p, n, seed + i * num_images + j)
                for i, (p, n) in enumerate(zip(prompts, negatives))
                for j in range(num_images)
            ]
        images = []
        for _, chunk in batches(jobs, batch_size, "images", progress):
            prompts_, negatives_, seeds_ = (list(column) for column in zip(*chunk))
            tokens = self.generate_tokens(prompts_, seeds_, settings, progress=progress, negative_prompts=negatives_)
            images += [to_pil(x) for x in self.decode_tokens(tokens)]
        return images

    def __call__(
        self,
        prompt: str | int | list[str | int],
        negative_prompt: str | int | list[str | int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        batch_size: int = 16,
        progress: bool = False,
        **options: Any,
    ) -> MMFusionOutput:
        """Text to image the way a diffusers pipeline is called: `pipe(prompt, negative_prompt=...,
        num_inference_steps=..., guidance_scale=..., num_images_per_prompt=..., generator=...).images`.

        `num_inference_steps` are the denoising steps of each AR step (CausalFusion); `options` are the
        other settings of the model's sampler by name (`ar_steps`, `order`, `cfg_interval`, `sampler` ...;
        for Token-Shuffle `temperature`, `top_k` ...). Image k is sampled with its own seed: `seed + k`,
        or, with `generator` (one, or one per image), a seed drawn from it: a generator seeded the same
        way gives the same images, and its state advances as in diffusers. The output carries the seeds,
        so `generate(..., seeds=out.seeds)` samples the same images again."""
        prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
        total = len(prompts) * num_images_per_prompt
        seeds = _seeds(total, generator, 0 if seed is None else seed)
        settings = self.image_settings(steps=num_inference_steps, cfg_scale=guidance_scale, **options)
        expanded = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = _per_prompt(negative_prompt, len(prompts), "negative prompts")
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        images = self.generate(
            expanded,
            seeds=seeds,
            settings=settings,
            negative_prompt=negatives,
            batch_size=batch_size,
            progress=progress,
        )
        return MMFusionOutput(images=images, seeds=seeds, prompts=expanded)

    # captioning ---------------------------------------------------------------------------
    def encode_images(self, images: list[Any]) -> torch.Tensor:
        size = self.image_cfg.image_size
        pixels = torch.stack([to_tensor(im, size, self.resize) for im in images])
        return self.image_tokenizer.encode(pixels.to(self._tokenizer_device())).cpu()

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (from the samplers, on the CPU) -> pixels (B, 3, H, W) on the CPU, decoded where the
        VAE / VQ model is (the model's device, unless only `pipe.model` was moved)."""
        return self.image_tokenizer.decode(tokens.to(self._tokenizer_device())).cpu()

    def _tokenizer_device(self) -> torch.device:
        return next((p.device for p in self.image_tokenizer.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def caption(
        self,
        images: Any | list[Any],
        batch_size: int = 32,
        seed: int = 0,
        progress: bool = False,
        settings: CaptionSampling | None = None,
        seeds: list[int] | None = None,
        **changes: Any,
    ) -> list[str]:
        """Captions for PIL images; `progress`: a bar over the images when there is more than one batch.
        Decoding follows `settings` (default: the model's, greedy unless set otherwise) with `changes` by
        name: the fields of `CaptionSampling`, as in `pipe.caption(image, method="beam", num_beams=4)`.
        Nucleus sampling draws caption i with seed `seed + i`, or `seeds[i]` when given: a caption then
        depends on its image, seed and settings, not on the batch it was decoded in."""
        if self.condition != "text":
            raise UserError("this model is class-conditional: it has no captioning head trained")
        images = images if isinstance(images, list) else [images]
        if seeds is not None and len(seeds) != len(images):
            raise UserError(f"got {len(seeds)} seeds for {len(images)} images")
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(images))]
        s = self.caption_settings(settings, **changes)
        t = self.text_tokenizer
        decoder = CaptionDecoder(self.model, t.bos_id, t.boi_id, t.eoi_id, t.eos_id, self._redraw_error)
        out = []
        for start, chunk in batches(images, batch_size, "captions", progress):
            gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds[start : start + len(chunk)]]
            ids = decoder(self.encode_images(chunk), s, gens)
            out += [t.decode(i) for i in ids]
        return out

    def _redraw_error(self, tokens: torch.Tensor, captions: list[list[int]], timesteps: int) -> torch.Tensor:
        """The T2I direction's error for each (image tokens, caption ids) pair: what reranks captions."""
        t = self.text_tokenizer
        return redraw_error(self.model, self.prompts, self.diffusion, tokens, captions, timesteps, (t.eos_id, t.eoi_id))

    # editing ------------------------------------------------------------------------------
    def token_mask(self, mask: Any) -> torch.Tensor:
        """Pixel mask (PIL / array, nonzero = regenerate) -> (N,) bool over image tokens."""
        size = self.image_cfg.image_size
        m = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask)
        if m.ndim == 3:
            m = m.max(-1)
        if m.shape != (size, size):
            raise UserError(
                f"mask is {m.shape[1]}x{m.shape[0]} pixels but the image is {size}x{size}: "
                "give a mask of the image's size"
            )
        gh, gw = self.image_tokenizer.grid
        cell = torch.from_numpy(m > 0).reshape(gh, size // gh, gw, size // gw)
        return cell.any(dim=3).any(dim=1).reshape(-1)

    @torch.no_grad()
    def edit(
        self,
        image: Any,
        mask: Any,
        prompt: str | int,
        seed: int = 0,
        num_images: int = 1,
        settings: DiffusionSampling | None = None,
        negative_prompt: str | None = None,
        **changes: Any,
    ) -> list[Any]:
        """Regenerate the masked tokens of `image` under `prompt`, conditioned on the visible ones, with
        the sampler's `settings` and `changes` as in `generate`, steering away from `negative_prompt`."""
        settings = self.image_settings(settings, **changes)
        regen = self.token_mask(mask)
        if not regen.any():
            raise UserError("the mask selects nothing to regenerate: paint the region to change white")
        tokens = self.encode_images([image]).expand(num_images, -1, -1)
        known_mask = (~regen)[None].expand(num_images, -1)
        out = self.generate_tokens(
            [prompt] * num_images,
            [seed + j for j in range(num_images)],
            settings,
            known=tokens,
            known_mask=known_mask,
            negative_prompts=[negative_prompt] * num_images,
        )
        return [to_pil(x) for x in self.decode_tokens(out)]


@dataclass
class MMFusionOutput:
    """What `pipe(...)` returns: the images, and the seed and prompt of each."""

    images: list[Any]
    seeds: list[int]
    prompts: list[str | int]


def _load_model(folder: Path, model_cfg: ModelConfig) -> MMFusionModel:
    """The model of `folder`'s model.safetensors, built on the meta device: the loaded tensors become the
    weights, so a large model is never held twice in memory."""
    with init_empty_weights():
        model = MMFusionModel(model_cfg)
    state = load_file(str(folder / "model.safetensors"))
    if model_cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model_cfg.tie_embeddings:  # `assign` made two Parameters over one tensor: one Parameter again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _per_prompt(value: Any, n: int, what: str) -> list[Any]:
    """One value for each of `n` prompts: a list of `n`, or one value (or None) for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"got {len(value)} {what} for {n} prompts: give one, or one per prompt")
        return list(value)
    return [value] * n


def _seeds(n: int, generator: torch.Generator | list[torch.Generator] | None, seed: int) -> list[int]:
    """The seed of each of `n` images: `seed + k`, or drawn from `generator` (one for all images, or one
    per image), 63-bit, so that the generator's state advances as diffusers' does."""
    if generator is None:
        return [seed + k for k in range(n)]
    gens = generator if isinstance(generator, list) else [generator] * n
    if len(gens) != n:
        raise UserError(f"got {len(gens)} generators for {n} images: give one, or one per image")
    return [int(torch.randint(0, 2**63 - 1, (), generator=g)) for g in gens]
