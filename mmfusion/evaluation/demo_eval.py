"""Evaluate a model on the shapes benchmark: T2I accuracy from the checker, captions on a held-out split."""

from __future__ import annotations

from typing import Any

from mmfusion.evaluation.captions import java_available, score_captions
from mmfusion.evaluation.shapes import benchmark_prompts, check_image, summarize


def evaluate_t2i(
    pipe: Any,
    n_single: int = 96,
    n_pair: int = 96,
    seed: int = 0,
    batch_size: int = 48,
    progress: bool = False,
    **settings: Any,
) -> tuple[dict[str, Any], list[Any], list[str]]:
    """Generate for the shapes benchmark prompts and judge every image with the analytic checker."""
    prompts = benchmark_prompts(n_single, n_pair, seed)
    images = pipe.generate(prompts, seed=seed, batch_size=batch_size, progress=progress, **settings)
    verdicts = [check_image(im, p) for im, p in zip(images, prompts)]
    return summarize(verdicts, prompts), images, prompts


def evaluate_captions(
    pipe: Any, split: Any, limit: int | None = None, batch_size: int = 64, progress: bool = False, **settings: Any
) -> tuple[dict[str, float] | dict[str, str], dict[int, str]]:
    """Greedy (or given) captions of a held-out split, scored with pycocoevalcap against its references."""
    n = len(split) if limit is None else min(limit, len(split))
    rows = [split[i] for i in range(n)]
    caps = pipe.caption([r["image"] for r in rows], batch_size=batch_size, progress=progress, **settings)
    candidates = dict(enumerate(caps))
    refs = {i: r["captions"] for i, r in enumerate(rows)}
    if not java_available():
        return {"skipped": "Java is not installed (apt-get install -y default-jre-headless)"}, candidates
    return score_captions(refs, candidates), candidates


def evaluate_classes(pipe: Any, per_class: int = 8, seed: int = 0, **settings: Any) -> tuple[dict[str, Any], list[Any]]:
    """Class-conditional shapes: generate per class, judge "a <class name>" with the checker."""
    names = pipe.class_names
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    images = pipe.generate(labels, seed=seed, batch_size=48, **settings)
    prompts = [f"a {names[c]}" for c in labels]
    verdicts = [check_image(im, p) for im, p in zip(images, prompts)]
    per_class_acc = {
        names[c]: sum(v.correct for v, lab in zip(verdicts, labels) if lab == c) / per_class for c in range(len(names))
    }
    summary = summarize(verdicts, prompts)["single"]
    summary["per_class"] = per_class_acc
    return summary, images
