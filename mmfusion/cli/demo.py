"""`mmfusion demo`: data -> training -> model folder -> samples, captions and metrics, on a CPU."""

# Deferred imports: the command imports torch and the library when it runs, so `--help` stays instant

from __future__ import annotations


def demo(
    overrides: list[str] = [],  # noqa: B006
    *,
    out: str = "demo",
    minutes: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    processes: int | None = None,
    resume: bool = False,
) -> None:
    """The CPU demo: render the shapes data, train the small joint T2I + captioning model, evaluate it.

    Writes OUT/model (the model folder), OUT/samples (grid.png: fixed prompts sampled in one AR step
    and one token per step in raster order, side by side; index.json), OUT/captions.json (held-out
    test images), OUT/metrics.json (T2I accuracy from the shapes checker at S = 1, S = 4 in random
    order and S = 16 in raster order; caption content accuracy and BLEU-4 / METEOR / ROUGE-L / CIDEr
    from pycocoevalcap) and OUT/eval_grid.png.

    Args:
        overrides: dotted changes to the demo config (configs/demo.yaml), e.g. model.dim=192 train.lr=1e-3
        out: output folder
        minutes: training time budget (default: the demo config's, chosen so that everything takes at
            most 15 minutes on 2 CPU cores)
        seed: random seed of data, training and sampling
        threads: torch CPU threads per training process (default: the cores, shared out between the
            processes)
        processes: training processes (default: 2 on a machine with two or more cores, else 1). Two
            processes train data-parallel (Lightning DDP over gloo). The demo's batch is global
            (data.global_batch_size, 128), so any number of processes trains the same recipe: two
            take 64 samples each, one takes all 128.
        resume: go on with a demo that was stopped (Ctrl-C, SIGTERM) from OUT/checkpoints/last.ckpt, with
            the same options: the rest of its time budget, then the evaluation
    """
    from mmfusion.training.demo import run_demo

    run_demo(overrides, out=out, minutes=minutes, seed=seed, threads=threads, processes=processes, resume=resume)
