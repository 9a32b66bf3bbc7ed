"""Model folders, on disk and as the Hugging Face Hub holds them: the files a folder must have, where its
VAE / VQ model is, a model id resolved to a folder through the hub's cache, the format version of
`config.json` and how an older one is read, and the model card (README.md) that names the model's
library, task and figures on the hub."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mmfusion.errors import UserError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# what a model repository on the hub may hold for mmfusion: the files, the card, a bundled VAE / VQ model
HUB_FILES = [*MODEL_FILES, "README.md", "image_tokenizer/*"]
MODEL_TYPE = "mmfusion"
# 1: `"format": "mmfusion"` (no model_type, no format_version); 2: model_type, format_version, training_data
FORMAT_VERSION = 2


TOKENIZERS = {"pixels": "pixel patches", "vae": "VAE latents", "vq": "VQ codes"}


# resolving a model ----------------------------------------------------------------------------
def offline() -> bool:
    """The hub's offline mode: HF_HUB_OFFLINE as huggingface_hub read it at import, or as it is now."""
    now = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE or now)


def resolve_model(
    model: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of `model`: itself when it exists here, else the snapshot of the hub model of that
    id ("owner/name") at `revision` (a branch, tag or commit hash; default main), from the hub's cache
    (`cache_dir`, default HF_HUB_CACHE) or downloaded into it. Offline (HF_HUB_OFFLINE=1, or
    `local_files_only`) only the cache is read. Any failure is a one-line UserError naming the fix."""
    if Path(model).exists() or isinstance(model, Path) or not _looks_like_id(str(model)):
        return Path(model)
    cache_only = local_files_only or offline()
    try:
        return Path(
            snapshot_download(
                str(model),
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=cache_only,
                allow_patterns=HUB_FILES,
                library_name="mmfusion",
            )
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise UserError(_hub_problem(str(model), revision, cache_dir, cache_only, e)) from e


def _looks_like_id(name: str) -> bool:
    """`owner/name`: two parts, neither empty nor a relative step, nothing that reads as a local path."""
    parts = name.split("/")
    return len(parts) == 2 and all(p and p not in (".", "..") for p in parts) and not name.startswith("~")


def _hub_problem(model: str, revision: str | None, cache_dir: Any, cache_only: bool, e: Exception) -> str:
    at = f" at revision {revision}" if revision else ""
    here = f"{model} is not a folder here"
    if isinstance(e, HFValidationError):
        return f"{here} nor a valid hub model id (owner/name): give a model folder or a hub id"
    if isinstance(e, RevisionNotFoundError):
        return f"the hub model {model} has no revision {revision}: give one of its branches, tags or commit hashes"
    if isinstance(e, GatedRepoError):
        return f"the hub model {model} is gated: accept its terms on the hub, then `hf auth login` or pass token="
    if isinstance(e, RepositoryNotFoundError):
        return f"{here}, and the hub has no model {model} (a private one needs `hf auth login` or token=)"
    if isinstance(e, LocalEntryNotFoundError):
        cache = cache_dir or constants.HF_HUB_CACHE
        if cache_only:
            why = "local_files_only=True" if not offline() else "HF_HUB_OFFLINE=1"
            return (
                f"{here}, and the hub model {model}{at} is not in the hub cache {cache} while offline ({why}): "
                "download it once with network access (HF_HUB_OFFLINE unset), or give a model folder"
            )
        return (
            f"{here}, the hub could not be reached, and the hub model {model}{at} is not in the hub cache "
            f"{cache}: check the network (or HF_ENDPOINT), or copy the model folder here and give its path"
        )
    if isinstance(e, HfHubHTTPError):
        return f"could not fetch the hub model {model}{at}: {_first_line(e)}"
    return f"could not fetch the hub model {model}{at}: {type(e).__name__}: {_first_line(e)}"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# the format of config.json --------------------------------------------------------------------
def _v1_to_v2(config: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named its format in `format`; version 2 in `model_type`, with `format_version`."""
    config = {k: v for k, v in config.items() if k != "format"}
    return {"model_type": MODEL_TYPE, "format_version": 2, **config}


# MIGRATIONS[n] turns a version-n config into a version-(n + 1) one: a new version adds its step here,
# so every folder ever written reaches the current version's reader through the same chain
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`config` (a parsed config.json of any version this code knows) as the current version's."""
    kind = config.get("model_type", config.get("format", MODEL_TYPE))
    if kind != MODEL_TYPE:
        raise UserError(f"{where} is a {kind!r} model, not an mmfusion model folder (model_type {MODEL_TYPE!r})")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{where}: format_version must be a positive whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where} is a model folder of format version {version}, newer than this mmfusion reads (up to "
            f"{FORMAT_VERSION}): upgrade mmfusion (pip install -U mmfusion)"
        )
    for step in range(version, FORMAT_VERSION):
        config = MIGRATIONS[step](config)
    return config


def config_header() -> dict[str, Any]:
    """What config.json begins with: the model type and the format version this code writes."""
    return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION}


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json, migrated to the current format version."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-export the model folder") from e
    return migrate(config, str(path))


# the model card -------------------------------------------------------------------------------
def data_name(source: str | None) -> str | None:
    """How a model card names training data: a local folder by its name (its path is this machine's),
    a hub data set by its id, the built-in shapes as `shapes`."""
    if not source:
        return None
    return Path(source).name if Path(source).exists() else str(source)


def model_card(config: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """README.md of a model folder: the hub's YAML metadata, what the model is, how to load it, and
    `metrics` (name -> figure, or nested dicts of them) when they were measured."""
    model, image, data = config["model"], config.get("image", {}), config.get("training_data")
    text = config.get("condition", "text") == "text"
    discrete = model.get("image_codebook_size", 0) > 0
    method = "Token-Shuffle (discrete VQ codes)" if discrete else "CausalFusion (next-token(s) diffusion)"
    meta: dict[str, Any] = {"library_name": "mmfusion"}
    if text:
        meta["pipeline_tag"] = "text-to-image"
    tags = ["mmfusion", "token-shuffle" if discrete else "causalfusion"]
    tags += ["text-to-image", "image-to-text", "image-captioning"] if text else ["class-conditional"]
    meta["tags"] = tags
    if data and re.fullmatch(r"[\w.-]+/[\w.-]+", data):  # a hub data set's id
        meta["datasets"] = [data]
    size, kind = image.get("image_size", "?"), image.get("kind", "pixels")
    does = "generates images from text and captions images" if text else "generates images of classes"
    lines = [
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---",
        "",
        "# An mmfusion model",
        "",
        f"One LLaMA-style decoder-only transformer that {does}: {method}; width {model['dim']}, "
        f"{model['n_layers']} layer(s); {size}x{size} images as {TOKENIZERS.get(kind, kind)}.",
    ]
    if data:
        lines += ["", f"Training data: {data}" + (" (mmfusion's synthetic shapes)" if data == "shapes" else "")]
    use = 'pipe.generate(["a red circle"])\ncaptions = pipe.caption(images)' if text else "pipe.generate([0])"
    lines += ["", "```python", "from mmfusion import MMFusion", "", 'pipe = MMFusion.from_pretrained("OWNER/NAME")']
    lines += [f"images = {use}", "```"]
    figures = _flat(metrics or {})
    if figures:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4g} |" for name, value in figures.items()]
    return "\n".join(lines) + "\n"


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of nested `metrics`, named by their dotted path."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`: a crash never leaves a
    half-written file, and neither do two writers of the same path at once (each writes a temporary
    file of its own; a fixed name would let one rename the file the other is still writing)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_model_card(folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write (or rewrite, with figures measured later) the README.md of the model folder `folder`."""
    card = model_card(read_config(Path(folder)), metrics)
    return write_atomic(Path(folder) / "README.md", lambda p: p.write_text(card))


def absolute_local_path(image: dict[str, Any]) -> dict[str, Any]:
    """The image tokenizer's config with a local VAE / VQ folder recorded by its absolute path, so that
    a model folder finds it from wherever it is used (a relative one would be looked up on the hub)."""
    path = image.get("path")
    if image.get("kind") in ("vae", "vq") and path and Path(path).exists():
        return {**image, "path": str(Path(path).resolve())}
    return image


def image_tokenizer_path(folder: Path, path: str | None) -> str | None:
    """Where a model folder's VAE / VQ model is: MODEL/image_tokenizer when that folder exists (a model
    folder made self-contained by copying its tokenizer in), else the path recorded at training."""
    inside = folder / "image_tokenizer"
    if inside.is_dir():
        return str(inside.resolve())
    if path and Path(path).is_absolute() and not Path(path).exists():
        raise UserError(
            f"{folder} refers to its image tokenizer at {path}, which does not exist: copy that VAE / VQ "
            f"folder to {inside} (or fix image.path in {folder / 'config.json'})"
        )
    return path


def check_model_folder(folder: Path) -> Path:
    """`folder`, checked to be a model folder with all its files."""
    if folder.is_file():  # a checkpoint, say: the model folder is the run's model/
        raise UserError(
            f"{folder} is a file; --model takes a model folder (config.json, model.safetensors, "
            "tokenizer.json): a training run writes it to OUT/model"
        )
    if not folder.is_dir():
        raise UserError(
            f"model folder {folder} does not exist (train one with `mmfusion train` or `mmfusion demo`, "
            "or give a hub id: owner/name)"
        )
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"model folder {folder} is missing {', '.join(missing)}: re-export it with "
            "`mmfusion train` or copy the whole folder"
        )
    return folder
