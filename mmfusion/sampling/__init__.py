"""Sampling: text-to-image generation, captioning and editing."""
