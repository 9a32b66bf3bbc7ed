"""Evaluate a model on the shapes benchmark: T2I accuracy from the checker, captions on a held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfusion.data.shapes import render_example
from mmfusion.evaluation.caption_content import caption_content
from mmfusion.evaluation.captions import java_available, score_captions
from mmfusion.evaluation.report import write_json
from mmfusion.evaluation.shapes import benchmark_prompts, check_image, summarize
from mmfusion.image_io import make_grid, write_outputs

# the demo's sample grid: six prompts of one object, six of two objects and a relation
FIXED_PROMPTS = [
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow circle",
    "a red triangle",
    "a blue square",
    "a red circle to the left of a blue square",
    "a green triangle above a yellow circle",
    "a blue circle to the right of a red triangle",
    "a yellow square below a green circle",
    "a red square above a blue circle",
    "a green circle to the left of a yellow triangle",
]


def ar_modes(n_tokens: int) -> dict[str, dict[str, Any]]:
    """The ways the benchmark samples a CausalFusion model: one AR step (the model's own settings),
    4 AR steps in random order, and one token per step in raster order (S = N)."""
    return {
        "S=1": {"ar_steps": 1},
        f"S={min(4, n_tokens)} random": {"ar_steps": min(4, n_tokens), "order": "random"},
        f"S={n_tokens} raster": {"ar_steps": n_tokens, "order": "raster"},
    }


def evaluate_t2i_modes(
    pipe: Any,
    n_single: int = 96,
    n_pair: int = 96,
    seed: int = 0,
    progress: bool = False,
    modes: dict[str, dict[str, Any]] | None = None,
    settings: Any = None,
) -> dict[str, tuple[dict[str, Any], list[Any], list[str]]]:
    """`evaluate_t2i` in each of `modes` (default: every AR mode of `ar_modes`; a Token-Shuffle model has
    one, its autoregressive sampler "AR"), with the same prompts and seeds in each, keyed by mode. A mode
    is a set of changes to `settings` (default: the model's own sampler settings)."""
    cfg = pipe.model.cfg
    if modes is None:
        modes = {"AR": {}} if cfg.discrete else ar_modes(cfg.num_image_tokens)
    out = {}
    for name, mode in modes.items():
        if progress:
            print(f"text to image, {name}")
        mode_settings = pipe.image_settings(settings, **mode)
        out[name] = evaluate_t2i(pipe, n_single, n_pair, seed=seed, progress=progress, settings=mode_settings)
    return out


def shapes_test_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first `n` images of the shapes test split for `seed`, with their captions and scenes."""
    return [render_example(seed, "test", i) for i in range(n)]


def evaluate_t2i(
    pipe: Any,
    n_single: int = 96,
    n_pair: int = 96,
    seed: int = 0,
    batch_size: int = 48,
    progress: bool = False,
    settings: Any = None,
) -> tuple[dict[str, Any], list[Any], list[str]]:
    """Generate for the shapes benchmark prompts with the sampler's `settings` (default: the model's) and
    judge every image with the analytic checker."""
    prompts = benchmark_prompts(n_single, n_pair, seed)
    images = pipe.generate(prompts, seed=seed, batch_size=batch_size, progress=progress, settings=settings)
    verdicts = [check_image(im, p) for im, p in zip(images, prompts)]
    return summarize(verdicts, prompts), images, prompts


def evaluate_captions(
    pipe: Any, split: Any, limit: int | None = None, batch_size: int = 64, progress: bool = False, settings: Any = None
) -> tuple[dict[str, float] | dict[str, str], dict[int, str]]:
    """Captions of a held-out split (decoded with `settings`, default the model's: greedy), scored with
    pycocoevalcap against its references, and, for shapes rows (which carry their scene), by content:
    see `caption_content`."""
    n = len(split) if limit is None else min(limit, len(split))
    rows = [split[i] for i in range(n)]
    caps = pipe.caption([r["image"] for r in rows], batch_size=batch_size, progress=progress, settings=settings)
    candidates = dict(enumerate(caps))
    refs = {i: r["captions"] for i, r in enumerate(rows)}
    content = {"content": caption_content(caps, rows)} if rows and "objects" in rows[0] else {}
    if not java_available():
        return {"skipped": "Java is not installed (apt-get install -y default-jre-headless)", **content}, candidates
    return {**score_captions(refs, candidates), **content}, candidates


def evaluate_classes(
    pipe: Any, per_class: int = 8, seed: int = 0, settings: Any = None
) -> tuple[dict[str, Any], list[Any]]:
    """Class-conditional shapes: generate per class, judge "a <class name>" with the checker."""
    names = pipe.class_names
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    images = pipe.generate(labels, seed=seed, batch_size=48, settings=settings)
    prompts = [f"a {names[c]}" for c in labels]
    verdicts = [check_image(im, p) for im, p in zip(images, prompts)]
    per_class_acc = {
        names[c]: sum(v.correct for v, lab in zip(verdicts, labels) if lab == c) / per_class for c in range(len(names))
    }
    summary = summarize(verdicts, prompts)["single"]
    summary["per_class"] = per_class_acc
    return summary, images


def write_fixed_prompt_grid(pipe: Any, out: Path, seed: int, per_prompt: int = 4) -> None:
    """OUT/grid.png: one row per fixed prompt, `per_prompt` images sampled in one AR step, then as many
    sampled one token per step in raster order (S = N), same seeds; plus one PNG per image."""
    n_tokens = pipe.model.cfg.num_image_tokens
    modes = [{}] if pipe.model.cfg.discrete else [{"ar_steps": 1}, {"ar_steps": n_tokens, "order": "raster"}]
    by_mode = [pipe.generate(FIXED_PROMPTS, num_images=per_prompt, seed=seed, **mode) for mode in modes]
    images, records = [], []
    for k, prompt in enumerate(FIXED_PROMPTS):
        for mode, made in zip(modes, by_mode):
            for j in range(per_prompt):
                i = k * per_prompt + j
                images.append(made[i])
                name = f"{k:02d}_{j}" + (f"_S{mode['ar_steps']}" if mode else "")
                records.append({"file": f"{name}.png", "prompt": prompt, "seed": seed + i, **mode})
    write_outputs(out, images, records, scale=4, cols=per_prompt * len(modes))


def evaluate_shapes_model(
    pipe: Any,
    test: Any,
    seed: int = 0,
    n_single: int = 96,
    n_pair: int = 96,
    progress: bool = False,
    modes: dict[str, dict[str, Any]] | None = None,
    settings: Any = None,
    caption_settings: Any = None,
) -> tuple[dict[str, Any], list[Any]]:
    """The whole shapes benchmark of a joint model: T2I accuracy in each AR mode (`evaluate_t2i_modes`),
    captions of the `test` rows (none when empty) scored by pycocoevalcap and by content. Returns the
    metrics (with the captions under "captions", one record per test image) and the images of the first
    mode. `settings` / `caption_settings`: the image sampler's and the captions' (default: the model's)."""
    by_mode = evaluate_t2i_modes(pipe, n_single, n_pair, seed, progress, modes, settings)
    metrics: dict[str, Any] = {"t2i": {name: summary for name, (summary, _, _) in by_mode.items()}}
    if len(test):
        if progress:
            print(f"captions of {len(test)} test images")
        scores, captions = evaluate_captions(pipe, test, progress=progress, settings=caption_settings)
        metrics["caption"] = scores
        metrics["captions"] = [
            {"image": i, "caption": c, "references": test[i]["captions"]} for i, c in captions.items()
        ]
    return metrics, next(iter(by_mode.values()))[1]


def run_shapes_benchmark(
    pipe: Any,
    out: Path,
    test: Any,
    seed: int = 0,
    n_single: int = 96,
    n_pair: int = 96,
    modes: dict[str, dict[str, Any]] | None = None,
    settings: Any = None,
    caption_settings: Any = None,
) -> dict[str, Any]:
    """The shapes benchmark of any shapes model, written into `out`: shapes_metrics.json, shapes_grid.png
    and, when `test` has rows to caption, captions.json. A class-conditional model is judged per class; a
    joint model as `evaluate_shapes_model`. Returns the metrics (without the captions)."""
    out.mkdir(parents=True, exist_ok=True)
    if pipe.condition == "class":
        per_class = max(1, n_single // len(pipe.class_names))
        summary, images = evaluate_classes(pipe, per_class=per_class, seed=seed, settings=settings)
        metrics = {"t2i": {"class": {"single": summary}}}
    else:
        metrics, images = evaluate_shapes_model(
            pipe, test, seed, n_single, n_pair, True, modes, settings, caption_settings
        )
        if "captions" in metrics:
            write_json(out / "captions.json", metrics.pop("captions"))
    make_grid(images, cols=16, scale=3).save(out / "shapes_grid.png")
    write_json(out / "shapes_metrics.json", metrics)
    return metrics


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The benchmark's figures as a few lines for the terminal."""
    lines = []
    for name, t in metrics["t2i"].items():
        pair = f", two objects + relation {t['pair']['accuracy']:.1%}" if "pair" in t else ""
        one = f"one object {t['single']['accuracy']:.1%}" if "single" in t else ""
        lines.append(f"T2I {name}: {one}{pair}".replace(": , ", ": "))
    c = metrics.get("caption")
    if c is None:
        return lines
    if "content" in c:
        parts = [
            f"{'one object' if k == 'single' else 'two objects'} {v['accuracy']:.1%}" for k, v in c["content"].items()
        ]
        lines.append("captions naming the right content: " + ", ".join(parts))
    if "CIDEr" in c:
        lines.append(
            f"captions (pycocoevalcap): BLEU-4 {c['Bleu_4']:.3f}  METEOR {c['METEOR']:.3f}  "
            f"ROUGE-L {c['ROUGE_L']:.3f}  CIDEr {c['CIDEr']:.3f}"
        )
    else:
        lines.append(f"caption metrics skipped: {c.get('skipped')}")
    return lines
