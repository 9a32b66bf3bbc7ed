"""`mmfusion data ...` and `mmfusion tokenizer ...`."""

# Deferred imports: the commands import torch and the library when they run, so `--help` stays instant

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mmfusion.errors import UserError


def shapes(
    *,
    out: str,
    n: int = 10000,
    size: int = 32,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int | None = None,
    pair_fraction: float = 0.5,
    colours: str = "red,green,blue,yellow",
    shapes: str = "circle,square,triangle",
    domain: str | None = None,
) -> None:
    """Render the built-in captioned "shapes" data set and save it as a `datasets` DatasetDict.

    One or two solid objects (circle, square, triangle; red, green, blue, yellow) on white; pairs
    stand in a relation (left of, right of, above, below). Each image has 6 captions. A downstream
    domain (--domain new_shapes: crosses, diamonds, rings; --domain digits: purple and orange two,
    three, five, seven) is a set of the same kind whose words the base set never shows, for fine-tuning.

    Args:
        out: folder to write (loadable with `datasets.load_from_disk`)
        n: number of training images
        size: image side in pixels, 32 or 64
        seed: random seed; the same seed renders the same images
        n_val: validation images (default: n / 20, at least 100 and at most 1,000)
        n_test: test images (default: n / 20, at least 200 and at most 1,000)
        pair_fraction: fraction of images with two objects
        colours: comma-separated palette (also purple, orange: a shifted set for fine-tuning)
        shapes: comma-separated object kinds (also cross, diamond, ring, two, three, five, seven)
        domain: new_shapes or digits: sets the colours and shapes of that downstream domain
    """
    from mmfusion.data.shapes import build_shapes

    palette, kinds = _names(colours), _names(shapes)
    if domain is not None:
        palette, kinds = _domain(domain, palette, kinds)
    try:
        ds = build_shapes(
            n=n,
            size=size,
            seed=seed,
            n_val=n_val,
            n_test=n_test,
            pair_fraction=pair_fraction,
            colours=palette,
            shapes=kinds,
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    ds.save_to_disk(out)
    counts = ", ".join(f"{k}: {len(v)}" for k, v in ds.items())
    print(f"wrote shapes ({counts}) to {out}")


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _domain(domain: str, palette: tuple[str, ...], kinds: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The colours and shapes of a downstream domain; refused by name when unknown, and when --colours or
    --shapes ask for others (the domain sets both)."""
    from mmfusion.data.shapes import COLOURS, DOMAINS, SHAPES

    if domain not in DOMAINS:
        raise UserError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if palette != tuple(COLOURS) or kinds != SHAPES:
        raise UserError("--domain sets the colours and shapes; give it without --colours and --shapes")
    return DOMAINS[domain]["colours"], DOMAINS[domain]["shapes"]


def export(*, data: str, out: str, format: Literal["imagefolder", "coco"] = "imagefolder", split: str = "test") -> None:
    """Export a saved data set as an imagefolder (PNG + metadata.jsonl) or as COCO caption JSON.

    Args:
        data: a folder written by `mmfusion data shapes` (or any saved DatasetDict with image/captions)
        out: output folder
        format: imagefolder (all splits) or coco (one split: OUT/captions_SPLIT.json + OUT/SPLIT/*.png)
        split: the split to export as COCO
    """
    import datasets

    from mmfusion.data.shapes import export_coco, export_imagefolder

    ds = datasets.load_from_disk(data)
    if format == "imagefolder":
        export_imagefolder(ds, out)
        print(f"wrote imagefolder to {out}")
    else:
        path = export_coco(ds[split], Path(out) / f"captions_{split}.json", Path(out) / split)
        print(f"wrote {path} and images under {Path(out) / split}")


def tokenizer_train(
    *, data: str, out: str, vocab_size: int = 512, max_len: int = 35, caption_column: str | None = None
) -> None:
    """Train a byte-level BPE text tokenizer on the captions of a data set.

    Args:
        data: captioned data (any source `mmfusion train` reads), or a text file with one caption per line
        out: where to write tokenizer.json (a file path or a folder)
        vocab_size: BPE vocabulary size, special tokens included
        max_len: maximum number of text tokens kept per caption (CausalFusion: 35)
    """
    from mmfusion.training.tokenizer import train_text_tokenizer

    tok, path = train_text_tokenizer(data, out, vocab_size=vocab_size, max_len=max_len, caption_column=caption_column)
    print(f"wrote {path} ({len(tok)} tokens)")


def encode(
    *,
    data: str,
    out: str,
    image_tokenizer: Literal["vae", "pixels", "vq"] = "vae",
    vae: str | None = None,
    image_size: int = 256,
    patch_size: int = 2,
    batch_size: int = 32,
    image_root: str | None = None,
    resize: Literal["squash", "center_crop", "pad"] = "squash",
    image_column: str | None = None,
    caption_column: str | None = None,
) -> None:
    """Precompute image tokens (e.g. VAE latents) once into a `datasets` copy of the data.

    Training on the result reads the `tokens` column and never runs the VAE; the run's `image`
    config must match the one used here.

    Args:
        data: any captioned source (saved data set, imagefolder, COCO / Karpathy JSON, tables, hub name)
        out: folder for the encoded data set
        image_tokenizer: vae (AutoencoderKL latents), vq (VQ codes) or pixels
        vae: AutoencoderKL or VQModel folder or hub id (for vae and vq)
        image_size: images are resized to this side first (a note is printed when that enlarges them)
        patch_size: tokens are patch x patch cells of the latent (or pixel) grid
        batch_size: images encoded at once
        resize: how an image becomes square (the training config's data.resize): squash, center_crop or pad
    """
    from mmfusion.data.encode import encode_dataset
    from mmfusion.tokenizers.config import ImageTokenizerConfig

    cfg = ImageTokenizerConfig(kind=image_tokenizer, image_size=image_size, patch_size=patch_size, path=vae)
    path = encode_dataset(data, out, cfg, batch_size, image_root, resize, image_column, caption_column)
    print(f"wrote encoded data set to {path}")


def vae_train(
    *,
    data: str,
    out: str,
    image_size: int = 32,
    channels: list[int] | None = None,
    latent_channels: int = 4,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 2e-4,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> None:
    """Train a small AutoencoderKL (diffusers) on a captioned image folder; saves a diffusers folder.

    Use it as the image tokenizer with `image.kind=vae image.path=OUT`.

    Args:
        data: any captioned source (saved data set, imagefolder, COCO / Karpathy JSON)
        out: output folder (config.json + diffusion_pytorch_model.safetensors)
        image_size: training image side
        channels: channels per level, repeat the flag per level (default 32, 64: downsampling x2)
        latent_channels: latent channels
        steps: training steps
        batch_size: images per step
        lr: learning rate
        kl_weight: weight of the KL term
        seed: random seed
    """
    from mmfusion.training.vae import VAEConfig, train_vae

    _check_training_run(steps, batch_size, lr)
    cfg = VAEConfig(
        image_size=image_size,
        channels=tuple(channels or (32, 64)),
        latent_channels=latent_channels,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        kl_weight=kl_weight,
    )
    train_vae(data, out, cfg, seed=seed)
    print(f"wrote AutoencoderKL to {out}")


def _check_training_run(steps: int, batch_size: int, lr: float) -> None:
    from mmfusion.errors import require

    require(
        [
            (steps >= 1, f"--steps must be at least 1, got {steps}"),
            (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
            (lr > 0, f"--lr must be positive, got {lr}"),
        ]
    )


def vq_train(
    *,
    data: str,
    out: str,
    quantizer: Literal["vq", "binary"] = "vq",
    image_size: int = 32,
    channels: list[int] | None = None,
    codebook_size: int = 256,
    bits: int = 8,
    embed_dim: int = 8,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
) -> None:
    """Train a small VQ image tokenizer (diffusers VQModel) for the discrete Token-Shuffle path.

    Use it with `image.kind=vq image.path=OUT`. With --quantizer binary, the codebook is replaced by a
    lookup-free binary quantiser: each code is `bits` bits (pair it with bitwise heads).

    Args:
        data: any captioned source (saved data set, imagefolder, COCO / Karpathy JSON)
        out: output folder
        quantizer: vq (learned codebook) or binary (lookup-free, d-bit codes)
        image_size: training image side
        channels: channels per level, repeat the flag per level (default 32, 64, 64: 8 x 8 codes at 32 px)
        codebook_size: codebook entries (vq)
        bits: bits per code (binary)
        embed_dim: code vector width (vq)
        steps: training steps
        batch_size: images per step
        lr: learning rate
        seed: random seed
    """
    from mmfusion.training.vae import VQConfig, train_vq

    _check_training_run(steps, batch_size, lr)
    cfg = VQConfig(
        image_size=image_size,
        channels=tuple(channels or (32, 64, 64)),
        quantizer=quantizer,
        codebook_size=codebook_size,
        bits=bits,
        embed_dim=embed_dim,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
    )
    train_vq(data, out, cfg, seed=seed)
    print(f"wrote VQModel ({quantizer}) to {out}")
