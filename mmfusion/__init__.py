"""mmfusion: one decoder-only transformer for text-to-image generation and image captioning."""

# Deferred imports: `import mmfusion` stays fast for the CLI; `mmfusion.MMFusion` imports the pipeline on first use

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import mmfusion` stays fast for the CLI
    if name == "MMFusion":
        from mmfusion.pipeline import MMFusion

        return MMFusion
    if name == "ModelConfig":
        from mmfusion.model.config import ModelConfig

        return ModelConfig
    if name in ("DiffusionSampling", "TokenSampling", "CaptionSampling"):
        from mmfusion.generation import settings

        return getattr(settings, name)
    raise AttributeError(name)
