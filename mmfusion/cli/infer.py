"""`mmfusion generate`, `mmfusion caption`, `mmfusion edit`."""

# Deferred imports: the commands import torch and the library when they run, so `--help` stays instant

from __future__ import annotations

from pathlib import Path
from typing import Literal


def _load(  # noqa: ANN202
    model: str, adapter: list[str] | None, dtype: str = "float32", device: str = "auto", revision: str | None = None
):
    """A model folder, or a hub model by its id (owner/name) at `revision`; HF_HUB_OFFLINE=1 reads the cache only."""
    from mmfusion.pipeline import MMFusion

    return MMFusion.from_pretrained(model, adapters=adapter, dtype=dtype, device=device, revision=revision)


def _check_view(cfg_interval: list[float] | None, scale: int) -> None:
    from mmfusion.errors import require

    require(
        [
            (
                cfg_interval is None or len(cfg_interval) == 2,
                "--cfg-interval takes two values: --cfg-interval LO --cfg-interval HI",
            ),
            (scale >= 1, f"--scale enlarges the grid: it must be at least 1, got {scale}"),
        ]
    )


def generate(
    *,
    model: str,
    prompt: list[str],
    out: str,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    ar_steps: int | None = None,
    order: Literal["random", "raster", "block_raster"] | None = None,
    sampler: Literal["ddpm", "ddim"] | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    cfg_interval: list[float] | None = None,
    cfg_until_step: int | None = None,
    temperature: float | None = None,
    lookahead: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_schedule: Literal["constant", "linear", "cosine"] | None = None,
    batch_size: int = 16,
    scale: int = 4,
    adapter: list[str] | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
    revision: str | None = None,
) -> None:
    """Generate images from text prompts: one PNG per image, OUT/grid.png and OUT/index.json. Sampler
    options change the settings saved with the model (Token-Shuffle models: those marked so).

    Args:
        prompt: a text prompt; repeat --prompt for several (class-conditional models: a class name or index)
        out: output folder
        negative_prompt: what guidance steers away from, instead of the unconditional stream (needs --cfg > 1)
        num_images: images per prompt
        seed: image j of prompt i uses seed + i * num_images + j
        ar_steps: AR steps S (1 = pure diffusion, N tokens = pure AR)
        order: token order of the AR steps
        sampler: ddpm or ddim
        steps: denoising steps per AR step
        cfg: classifier-free guidance scale (1 disables it)
        cfg_interval: guide only for noise levels t/T in [LO, HI]: --cfg-interval LO --cfg-interval HI
        cfg_until_step: no guidance after this AR step
        temperature: scale of the noise each denoising step adds (Token-Shuffle: softmax temperature of the codes)
        lookahead: tokens beyond each AR group denoised with it, then dropped (0: the paper's sampler)
        top_k: Token-Shuffle: keep the k most likely codes (0: all)
        top_p: Token-Shuffle: nucleus of this probability mass
        cfg_schedule: Token-Shuffle: guidance constant, or ramping from 1 to --cfg over the tokens
        batch_size: images sampled at once
        scale: the grid is enlarged this many times (nearest neighbour) for viewing
    """
    _check_view(cfg_interval, scale)
    pipe = _load(model, adapter, dtype, device, revision)
    flags = dict(ar_steps=ar_steps, order=order, sampler=sampler, steps=steps, cfg_until_step=cfg_until_step)
    flags.update(cfg_scale=cfg, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p)
    settings = pipe.image_settings(**flags, lookahead=lookahead, cfg_schedule=cfg_schedule)
    kwargs = dict(num_images=num_images, seed=seed, batch_size=batch_size, negative_prompt=negative_prompt)
    images = pipe.generate(prompt, progress=True, settings=settings, **kwargs)
    _write_images(out, images, prompt, num_images, seed, scale)


def _write_images(out: str, images: list, prompts: list[str], num_images: int, seed: int, scale: int) -> None:
    from mmfusion.image_io import write_generated

    write_generated(out, images, prompts, num_images, seed, scale)
    print(f"wrote {len(images)} images, grid.png and index.json to {out}")


def caption(
    images: list[str],
    *,
    model: str,
    json: str | None = None,
    method: Literal["greedy", "beam", "nucleus"] | None = None,
    num_beams: int | None = None,
    rerank_weight: float | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    adapter: list[str] | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
    revision: str | None = None,
) -> None:
    """Caption images; prints `path: caption` lines and optionally writes a JSON {path: caption}.

    Decoding options change the caption settings saved with the model.

    Args:
        images: image files
        json: write the captions here as JSON mapping each image path to its caption
        method: greedy, beam or nucleus decoding
        num_beams: beams for beam search
        rerank_weight: beam search's candidates scored by log-probability minus this x the error of
          redrawing the image from each (0: off)
        top_p: nucleus mass for nucleus sampling
        temperature: softmax temperature for nucleus sampling
        max_new_tokens: caption length limit in tokens
        seed: seed of nucleus sampling
    """
    from mmfusion.evaluation.report import write_json
    from mmfusion.image_io import open_image

    pils = [open_image(p) for p in images]
    pipe = _load(model, adapter, dtype, device, revision)
    settings = pipe.caption_settings(
        method=method,
        num_beams=num_beams,
        rerank_weight=rerank_weight,
        top_p=top_p,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
    )
    caps = pipe.caption(pils, seed=seed, progress=True, settings=settings)
    result = dict(zip(images, caps))
    for path, cap in result.items():
        print(f"{path}: {cap}")
    if json:
        write_json(Path(json), result)


def edit(
    *,
    model: str,
    image: str,
    mask: str,
    prompt: str,
    out: str,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    ar_steps: int | None = None,
    sampler: Literal["ddpm", "ddim"] | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    scale: int = 4,
    adapter: list[str] | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
    revision: str | None = None,
) -> None:
    """Zero-shot editing / inpainting: regenerate the masked region of an image under a prompt.

    The visible tokens are given to the model as finished (clean) AR groups; only the tokens under
    the mask are generated, as the next AR step(s). Writes the edits, grid.png (with the input and
    the mask first) and index.json.

    Args:
        image: the image to edit (resized to the model's image size)
        mask: a mask image of the same size; white (nonzero) pixels are regenerated
        prompt: the text prompt for the edited image
        out: output folder
        negative_prompt: what guidance steers away from (needs --cfg > 1)
        num_images: number of edits
        seed: edit j uses seed + j
        ar_steps: AR steps over the masked tokens
        sampler: ddpm or ddim
        steps: denoising steps per AR step
        cfg: classifier-free guidance scale
        scale: the grid is enlarged this many times for viewing
    """
    from mmfusion.image_io import open_image, to_pil, to_tensor, write_outputs

    _check_view(None, scale)
    pipe = _load(model, adapter, dtype, device, revision)
    size = pipe.image_cfg.image_size
    img = open_image(image)
    img = to_pil(to_tensor(img, size, pipe.resize))
    m = open_image(mask, "mask")
    settings = pipe.image_settings(ar_steps=ar_steps, sampler=sampler, steps=steps, cfg_scale=cfg)
    edits = pipe.edit(
        img, m, prompt, seed=seed, num_images=num_images, settings=settings, negative_prompt=negative_prompt
    )
    records = [{"file": f"{k:04d}.png", "prompt": prompt, "seed": seed + k} for k in range(len(edits))]
    mask_rgb = m.convert("L").convert("RGB")
    write_outputs(out, [img, mask_rgb, *edits], [{"file": "input.png"}, {"file": "mask.png"}, *records], scale=scale)
    print(f"wrote {len(edits)} edits, grid.png and index.json to {out}")
