"""`mmfusion eval ...`: captioning metrics, the shapes benchmark, FID / CLIP score."""

# Deferred imports: the commands import torch and the library when they run, so `--help` stays instant

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mmfusion.errors import UserError, require
from mmfusion.evaluation.report import write_json


def caption(
    *,
    model: str,
    data: str,
    out: str,
    image_root: str | None = None,
    split: str = "test",
    limit: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    method: Literal["greedy", "beam", "nucleus"] | None = None,
    num_beams: int | None = None,
    rerank_weight: float | None = None,
    batch_size: int = 32,
    spice: bool | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
) -> None:
    """Caption a split and score it with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE).

    DATA is the Karpathy `dataset_coco.json` (with --image-root pointing at the COCO images), a
    COCO-format caption JSON, an imagefolder, or a saved data set such as the shapes set. Writes
    OUT/captions_results.json (COCO results format) and OUT/caption_metrics.json.

    Args:
        data: the captioned data to evaluate on
        out: output folder
        split: split to evaluate (Karpathy: test)
        limit: evaluate only the first N images
        method: greedy, beam or nucleus decoding (default: the model's caption settings)
        num_beams: beams for beam search (default: the model's)
        rerank_weight: beam search's candidates scored by log-probability minus this x the error of
          redrawing the image from each (0: off; default: the model's)
        batch_size: images captioned at once
        spice: force SPICE on (--spice) or off (--no-spice); default: only when its models are installed
    """
    from mmfusion.evaluation.captions import caption_split, run_caption_benchmark
    from mmfusion.pipeline import MMFusion

    rows = caption_split(data, split, image_root, limit, image_column, caption_column)
    pipe = MMFusion.from_pretrained(model, dtype=dtype, device=device)
    settings = pipe.caption_settings(method=method, num_beams=num_beams, rerank_weight=rerank_weight)
    metrics = run_caption_benchmark(pipe, rows, out, settings, batch_size, spice)
    print(" ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def shapes(
    *,
    model: str,
    out: str,
    data: str | None = None,
    captions: int = 1000,
    n_single: int = 96,
    n_pair: int = 96,
    seed: int = 0,
    ar_steps: int | None = None,
    order: Literal["random", "raster", "block_raster"] | None = None,
    sampler: Literal["ddpm", "ddim"] | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    temperature: float | None = None,
    lookahead: int | None = None,
    method: Literal["greedy", "beam", "nucleus"] | None = None,
    num_beams: int | None = None,
    rerank_weight: float | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
) -> None:
    """The shapes benchmark: text-to-image accuracy (GenEval-style) in several AR modes, and captions.

    Generates images for plain prompts (or per class for class-conditional models) and judges each with
    the analytic checker: object count, colour, shape, relative position, clutter. A CausalFusion model is
    sampled in one AR step, in 4 AR steps of random order and one token per step in raster order, unless
    --ar-steps picks one mode. Test images are captioned and scored by content (the right objects and
    relation, in any phrasing of the data's templates) and by pycocoevalcap. Every figure comes with its
    95% interval. Writes OUT/shapes_metrics.json, OUT/shapes_grid.png and OUT/captions.json.

    Args:
        out: output folder
        data: a saved shapes data set whose test split is captioned (default: rendered for --seed)
        captions: test images to caption (0: no captions)
        n_single: prompts naming one object (class-conditional: images per class = n_single / 12)
        n_pair: prompts naming two objects and a relation
        seed: random seed of prompts, sampling and the rendered test split
        ar_steps: sample in this many AR steps only (default: every AR mode of the benchmark)
        order: token order with --ar-steps (default: the model's)
        sampler: ddpm or ddim (default: the model's)
        steps: denoising steps per AR step
        cfg: guidance scale
        temperature: scale of the noise each denoising step adds (default: the model's)
        lookahead: tokens beyond each AR group denoised with it and dropped (default: the model's)
        method: caption decoding: greedy, beam or nucleus (default: the model's caption settings)
        num_beams: beams for beam search (default: the model's)
        rerank_weight: check beam search's candidates by redrawing the image from each, at this weight
    """
    from mmfusion.evaluation import demo_eval
    from mmfusion.pipeline import MMFusion

    modes = _shapes_modes(n_single, n_pair, captions, ar_steps, order)
    pipe = MMFusion.from_pretrained(model, dtype=dtype, device=device)
    changes = dict(sampler=sampler, steps=steps, cfg_scale=cfg, temperature=temperature, lookahead=lookahead)
    settings = pipe.image_settings(**changes)
    captioning = pipe.caption_settings(method=method, num_beams=num_beams, rerank_weight=rerank_weight)
    test = _shapes_test(data, captions, seed) if pipe.condition == "text" else []
    metrics = demo_eval.run_shapes_benchmark(pipe, Path(out), test, seed, n_single, n_pair, modes, settings, captioning)
    print("\n".join(demo_eval.summary_lines(metrics)))


def _shapes_modes(
    n_single: int, n_pair: int, captions: int, ar_steps: int | None, order: str | None
) -> dict[str, dict[str, Any]] | None:
    """The AR modes `eval shapes` samples (None: the benchmark's), once its counts are checked."""
    require(
        [
            (n_single >= 0 and n_pair >= 0, "--n-single and --n-pair must not be negative"),
            (n_single + n_pair > 0, "nothing to evaluate: give --n-single and / or --n-pair above 0"),
            (captions >= 0, "--captions must not be negative"),
            (order is None or ar_steps is not None, "--order needs --ar-steps (the benchmark's modes fix it)"),
        ]
    )
    if ar_steps is None:
        return None
    return {f"S={ar_steps}" + (f" {order}" if order else ""): {"ar_steps": ar_steps, "order": order}}


def _shapes_test(data: str | None, n: int, seed: int) -> Any:
    """The first `n` rows of the test split of saved shapes data, or of the one rendered for `seed`."""
    from mmfusion.evaluation.captions import caption_split
    from mmfusion.evaluation.demo_eval import shapes_test_rows

    if data is None:
        return shapes_test_rows(n, seed)
    rows = caption_split(data, "test", limit=n)
    if "objects" not in rows.column_names:
        raise UserError(f"{data} is not a shapes data set: its rows carry no scene to judge captions by")
    return rows


def generation(
    *,
    model: str,
    data: str,
    out: str,
    inception: str | None = None,
    clip: str | None = None,
    image_root: str | None = None,
    split: str = "test",
    n: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    image_column: str | None = None,
    caption_column: str | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
) -> None:
    """FID and / or CLIP score of text-to-image samples for the captions of a data set.

    One image is generated for the first caption of each of the first N images; FID compares them
    with those N real images (resized to the model's size). Weights come from local files only.

    Args:
        data: captioned data (Karpathy / COCO JSON, imagefolder, saved data set)
        out: output folder (generation_metrics.json)
        inception: local TorchScript Inception feature extractor for FID
        clip: local transformers CLIP folder for CLIP score
        split: split whose captions and images are used
        n: number of images
        seed: random seed
        batch_size: images generated at once
    """
    from mmfusion.evaluation.captions import caption_split
    from mmfusion.evaluation.generation import clip_score, frechet_distance
    from mmfusion.image_io import to_pil, to_tensor
    from mmfusion.pipeline import MMFusion

    if not inception and not clip:
        raise UserError("give --inception (FID) and / or --clip (CLIP score): local weights are required")
    pipe = MMFusion.from_pretrained(model, dtype=dtype, device=device)
    rows = caption_split(data, split, image_root, n, image_column, caption_column)
    prompts = [caps[0] for caps in rows["captions"]]
    fake = pipe.generate(prompts, seed=seed, batch_size=batch_size, progress=True)
    metrics = {"n": len(fake)}
    if inception:
        size = pipe.image_cfg.image_size
        real = [to_pil(to_tensor(im, size, pipe.resize)) for im in rows["image"]]
        metrics["fid"] = frechet_distance(real, fake, inception)
    if clip:
        metrics["clip_score"] = clip_score(fake, prompts, clip)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_json(outdir / "generation_metrics.json", metrics)
    print(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
