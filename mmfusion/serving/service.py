"""What the web demo does with a request, apart from the page: check the input, turn it into a call of
the pipeline, and run that call on the model worker, batched with other requests where the settings
allow. Every bad input is a `UserError` whose message the page shows as it is.

Text to image and captions batch across requests (`ModelWorker`); an edit runs alone (each has its own
image and mask). An image's seed is shown with it: `mmfusion generate --seed SEED` draws it again.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmfusion.errors import UserError
from mmfusion.image_io import open_image, to_uint8
from mmfusion.serving.batcher import ModelWorker

MAX_IMAGES = 16  # images per request
MAX_STEPS = 1000  # denoising steps per AR step
MAX_GUIDANCE = 30.0
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 1000


def _in_range(value: float | None, lo: float, hi: float, what: str) -> None:
    if value is None or not lo <= value <= hi:
        raise UserError(f"{what} must be between {lo:g} and {hi:g}, got {value}")


def _whole(value: float | None, lo: int, hi: int, what: str) -> int:
    _in_range(value, lo, hi, what)
    if float(value) != int(value):
        raise UserError(f"{what} must be a whole number, got {value}")
    return int(value)


def _prompt(text: str | None, what: str = "prompt") -> str:
    text = (text or "").strip()
    if not text:
        raise UserError(f"enter a {what}: the model draws what the text says")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"the {what} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are read")
    return text


class Service:
    """The demo's three tasks on one pipeline and one worker thread.

    `model_name` is how the page and the reproduce commands name the model (its folder or hub id)."""

    def __init__(self, pipe: Any, model_name: str, max_batch: int = 16, max_pending: int = 64) -> None:
        self.pipe = pipe
        self.model_name = model_name
        self.max_batch = max_batch
        self.worker = ModelWorker(max_batch=max_batch, max_pending=max_pending)

    # what the model offers -----------------------------------------------------------------------
    @property
    def discrete(self) -> bool:
        """Token-Shuffle (VQ codes) rather than CausalFusion (continuous tokens)."""
        return bool(self.pipe.model.cfg.discrete)

    @property
    def captions(self) -> bool:
        return self.pipe.condition == "text"

    @property
    def edits(self) -> bool:
        return not self.discrete

    @property
    def n_tokens(self) -> int:
        return int(self.pipe.model.cfg.num_image_tokens)

    @property
    def image_size(self) -> int:
        return int(self.pipe.image_cfg.image_size)

    def close(self) -> None:
        self.worker.close()

    # text to image -------------------------------------------------------------------------------
    def sampler_settings(self, options: dict[str, Any]) -> Any:
        """The image sampler's settings from the page's controls, range-checked."""
        opts = {k: v for k, v in options.items() if v is not None}
        if "cfg_scale" in opts:
            _in_range(opts["cfg_scale"], 0, MAX_GUIDANCE, "guidance scale")
        if self.discrete:
            if "top_k" in opts:
                opts["top_k"] = _whole(opts["top_k"], 0, 1 << 20, "top-k")
            if "top_p" in opts:
                _in_range(opts["top_p"], 1e-6, 1.0, "top-p")
            if "temperature" in opts:
                _in_range(opts["temperature"], 1e-3, 10.0, "temperature")
        else:
            if "ar_steps" in opts:
                opts["ar_steps"] = _whole(opts["ar_steps"], 1, self.n_tokens, "AR steps")
            if "steps" in opts:
                opts["steps"] = _whole(opts["steps"], 1, MAX_STEPS, "denoising steps")
            if "temperature" in opts:
                _in_range(opts["temperature"], 0.0, 10.0, "temperature")
        return self.pipe.image_settings(**opts)

    def text_to_image(
        self, prompt: str, negative_prompt: str | None, num_images: float, seed: float, options: dict[str, Any]
    ) -> list[tuple[Image.Image, int]]:
        """(image, seed) pairs: image k of the request is drawn with seed `seed + k`."""
        prompt, negative, n, seed, settings = self._image_request(prompt, negative_prompt, num_images, seed, options)
        items = [(prompt, negative, seed + k) for k in range(n)]

        def run(batch: list[tuple[Any, Any, int]]) -> list[Image.Image]:
            prompts, negatives, seeds = (list(c) for c in zip(*batch))
            return self.pipe.generate(
                prompts, seeds=seeds, settings=settings, negative_prompt=negatives, batch_size=self.max_batch
            )

        images = self.worker.submit(("image", settings), items, run)
        return list(zip(images, [s for _, _, s in items]))

    def _image_request(
        self, prompt: str, negative_prompt: str | None, num_images: float, seed: float, options: dict[str, Any]
    ) -> tuple[str | int, str | int | None, int, int, Any]:
        """What an image request (text to image or an edit) asks for, checked: (prompt, negative prompt
        or None, number of images, first seed, the sampler's settings)."""
        prompt = self._condition(prompt)
        negative = (negative_prompt or "").strip() or None
        if negative is not None:
            negative = self._condition(negative, "negative prompt")
        n = _whole(num_images, 1, MAX_IMAGES, "number of images")
        seed = _whole(seed, 0, MAX_SEED - MAX_IMAGES, "seed")
        return prompt, negative, n, seed, self.sampler_settings(options)

    def _condition(self, text: str | None, what: str = "prompt") -> str | int:
        text = _prompt(text, what)
        if self.pipe.condition != "text":  # class-conditional: a class name or number
            self.pipe.class_index(text)
        return text

    def reproduce_command(
        self, prompt: str, negative_prompt: str | None, num_images: float, seed: float, options: dict[str, Any]
    ) -> str:
        """The `mmfusion generate` command that draws the same images."""
        flags = {
            "ar_steps": "--ar-steps",
            "order": "--order",
            "sampler": "--sampler",
            "steps": "--steps",
            "cfg_scale": "--cfg",
            "temperature": "--temperature",
            "top_k": "--top-k",
            "top_p": "--top-p",
        }
        parts = [
            "mmfusion generate",
            "--model",
            shlex.quote(self.model_name),
            "--prompt",
            shlex.quote(str(prompt).strip()),
        ]
        if (negative_prompt or "").strip():
            parts += ["--negative-prompt", shlex.quote(negative_prompt.strip())]
        parts += ["--seed", str(int(seed)), "--num-images", str(int(num_images))]
        for key, value in options.items():
            if value is not None and key in flags:
                parts += [flags[key], str(value)]
        return " ".join(parts + ["--out", "out"])

    # captions ------------------------------------------------------------------------------------
    def caption(
        self,
        image: Image.Image | str | Path | None,
        method: str | None = None,
        num_beams: float | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: float = 0,
    ) -> str:
        """The caption of one image, of any size or mode (converted as training converts images). A
        setting left None is the model's own; those of another method than the one used are ignored."""
        return self.captions_of([image], method, num_beams, top_p, temperature, seed)[0]

    def captions_of(
        self,
        images: list[Image.Image | str | Path | None],
        method: str | None = None,
        num_beams: float | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: float = 0,
    ) -> list[str]:
        """`caption` for up to MAX_IMAGES images in one request, image k decoded with seed `seed + k`."""
        if not self.captions:
            raise UserError("this model is class-conditional: it has no captioning head trained")
        if not 1 <= len(images) <= MAX_IMAGES:
            raise UserError(f"send 1 to {MAX_IMAGES} images to caption in a request, got {len(images)}")
        images = [self.read_image(image, "an image to caption") for image in images]
        seed = _whole(seed, 0, MAX_SEED - MAX_IMAGES, "seed")
        settings = self._caption_settings(method, num_beams, top_p, temperature)

        def run(batch: list[tuple[Image.Image, int]]) -> list[str]:
            images, seeds = (list(c) for c in zip(*batch))
            return self.pipe.caption(images, seeds=seeds, settings=settings, batch_size=self.max_batch)

        return self.worker.submit(("caption", settings), [(im, seed + k) for k, im in enumerate(images)], run)

    def _caption_settings(
        self, method: str | None, num_beams: float | None, top_p: float | None, temperature: float | None
    ) -> Any:
        changes: dict[str, Any] = {"method": method}
        method = method or self.pipe.caption_settings().method
        if method == "beam" and num_beams is not None:
            changes["num_beams"] = _whole(num_beams, 1, 16, "beams")
        if method == "nucleus":
            for value, lo, hi, name in ((top_p, 1e-6, 1.0, "top_p"), (temperature, 1e-3, 10.0, "temperature")):
                if value is not None:
                    _in_range(value, lo, hi, name.replace("_", "-"))
                    changes[name] = float(value)
        return self.pipe.caption_settings(**changes)

    @staticmethod
    def read_image(image: Any, what: str) -> Image.Image:
        """An uploaded image in its own mode, or a one-line error: a PIL image, a file path, or a web
        page's file record (a dict with its `path`)."""
        if isinstance(image, dict):
            image = image.get("path")
        if image is None or (isinstance(image, str) and not image):
            raise UserError(f"upload {what}")
        if isinstance(image, Image.Image):
            return image
        return open_image(image, "uploaded file")

    # editing -------------------------------------------------------------------------------------
    def edit(
        self,
        image: Any,
        mask: Any,
        prompt: str,
        negative_prompt: str | None,
        num_images: float,
        seed: float,
        options: dict[str, Any],
    ) -> tuple[Image.Image, list[tuple[Image.Image, int]]]:
        """The input as the model sees it, and (edit, seed) pairs: the masked region redrawn under
        `prompt`. `image` is a PIL image or an image editor's value (background + painted layers); the
        mask is `mask` (an uploaded image of the same size, white = redraw) or else the painted layers."""
        if not self.edits:
            raise UserError("editing works on CausalFusion models only; this is a Token-Shuffle model")
        background, painted = _editor_parts(image)
        background = self.read_image(background, "an image to edit")
        if mask is not None and not (isinstance(mask, str) and not mask):
            regen = np.asarray(to_gray(self.read_image(mask, "a mask"))) > 127
            if regen.shape != (background.height, background.width):
                raise UserError(
                    f"the mask is {regen.shape[1]}x{regen.shape[0]} pixels but the image is "
                    f"{background.width}x{background.height}: upload a mask of the image's size"
                )
        elif painted is not None:
            regen = painted
        else:
            raise UserError("paint over the region to redraw with the brush, or upload a mask")
        if not regen.any():
            raise UserError(
                "the mask selects nothing: paint over the region to redraw, or upload a white-on-black mask"
            )
        small = self.model_mask(regen)
        prompt, negative, n, seed, settings = self._image_request(prompt, negative_prompt, num_images, seed, options)

        def run(batch: list[int]) -> list[Image.Image]:
            return self.pipe.edit(
                background, small, prompt, seed=seed, num_images=n, settings=settings, negative_prompt=negative
            )

        edits = self.worker.submit(("edit", object()), list(range(n)), run)
        seen = Image.fromarray(to_uint8(background, self.image_size, self.pipe.resize).permute(1, 2, 0).numpy())
        return seen, [(im, seed + k) for k, im in enumerate(edits)]

    def model_mask(self, regen: np.ndarray) -> Image.Image:
        """A boolean mask at the uploaded image's size -> the model's input size, through the same resize
        as the image: a pixel is redrawn where most of what it shrinks from was painted (or, for strokes
        too thin for that, any of it); padding added by the resize is kept."""
        keep = Image.fromarray(np.where(regen, 0, 255).astype(np.uint8)).convert("RGB")
        kept = to_uint8(keep, self.image_size, self.pipe.resize).min(dim=0).values.numpy()
        small = kept < 128
        if not small.any():
            small = kept < 255
        return Image.fromarray(np.where(small, 255, 0).astype(np.uint8))


def to_gray(image: Image.Image) -> Image.Image:
    """A mask image -> 8-bit gray; transparent pixels count as black (not painted)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return image.convert("L")


def _editor_parts(value: Any) -> tuple[Any, np.ndarray | None]:
    """An image editor's value (images or file records) -> (background, painted mask or None); a plain
    image or file -> (it, None)."""
    if not isinstance(value, dict) or "path" in value:
        return value, None
    background, layers = value.get("background"), value.get("layers") or []
    painted = None
    for layer in layers:
        if layer is None:
            continue
        alpha = np.asarray(Service.read_image(layer, "a brush layer").convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    return background, painted
