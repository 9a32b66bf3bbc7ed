"""`mmfusion train`."""

# Deferred imports: the command imports torch and the library when it runs, so `--help` stays instant

from __future__ import annotations


def train(
    overrides: list[str] = [],  # noqa: B006
    *,
    config: str | None = None,
    resume: bool = False,
    init_from_llm: str | None = None,
) -> None:
    """Train a model from a YAML config, with `section.key=value` overrides; writes OUT/model.

    Example: mmfusion train --config configs/demo.yaml train.max_steps=200 train.out=runs/try

    Args:
        overrides: dotted overrides such as train.lr=3e-4 model.preset=tiny data.batch_size=32
        config: a YAML run config (see configs/); defaults are used where it is silent
        resume: continue from OUT/checkpoints/last.ckpt (step, optimizer, EMA, LR schedule, data position)
        init_from_llm: a Hugging Face LLaMA / Qwen2 / Qwen3 folder (config.json, safetensors, tokenizer.json): the
            backbone takes its shape and weights, the text side its tokenizer
    """
    from mmfusion.config import load_config
    from mmfusion.training.run import train as run

    if init_from_llm:
        overrides = [*overrides, f"train.init_from_llm={init_from_llm}"]
    cfg = load_config(config, overrides)
    run(cfg, resume=resume)  # says where the model went, from rank 0
