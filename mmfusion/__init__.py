"""mmfusion: one decoder-only transformer for text-to-image generation and image captioning."""

__version__ = "0.1.0"
