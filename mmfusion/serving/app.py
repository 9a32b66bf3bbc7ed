"""The web demo's page (Gradio): text to image, captions and editing, one tab each.

The controls follow the model: CausalFusion shows AR steps, token order, sampler, steps and guidance;
Token-Shuffle shows temperature, top-k, top-p and guidance, and has no edit tab (editing needs
continuous tokens); a class-conditional model has no caption tab. Requests queue in Gradio with a bound
(`max_queue`; past it the page says the server is busy) and reach the model through the service's
worker, which batches them (`mmfusion.serving.batcher`). Bad input shows its message in the page.
`build_server` mounts the page beside the JSON API (`mmfusion.serving.rest`): what `mmfusion serve` runs.
"""

# Deferred imports: Gradio, FastAPI and the JSON API load when a server is built, so a missing [serve]
# extra is reported by `require_gradio` in one line rather than by an ImportError

from __future__ import annotations

import functools
import hashlib
import io
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmfusion.data.shapes import render_example
from mmfusion.errors import UserError
from mmfusion.hub import write_atomic
from mmfusion.serving.service import MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS, Service

# Gradio's queue recomputes a pandas summary of up to 10,000 past events after every event by default:
# per-request work that grows with the server's age. Summarise every 1,000 events, over the last 1,000
# (a user's own setting wins); and no usage analytics sent from the server
GRADIO_DEFAULTS = {
    "GRADIO_ANALYTICS_CACHE_FREQUENCY": "1000",
    "GRADIO_ANALYTICS_MAX_EVENTS": "1000",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
# images of a few dozen pixels are shown enlarged, as blocks rather than blurred
CSS = ".mmf-pixels img { image-rendering: pixelated; } .mmf-pixels canvas { image-rendering: pixelated; }"
SHAPES_PROMPTS = [
    ["a red circle", ""],
    ["a blue square", ""],
    ["a green triangle above a yellow circle", ""],
    ["a red circle to the left of a blue square", ""],
]


def require_gradio() -> Any:
    """The gradio module, or a one-line error naming the extra that installs it."""
    try:
        import gradio
    except ImportError as err:
        raise UserError(
            'the web demo needs Gradio: pip install -e ".[serve]" (or pip install "mmfusion[serve]")'
        ) from err
    return gradio


def shown_errors(gr: Any, fn: Callable) -> Callable:
    """`fn` with a bad input's message shown in the page (gr.Error) rather than a generic failure."""

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from err

    return wrapped


def build_app(service: Service, max_queue: int = 64, concurrency: int = 8) -> Any:
    """The page as a gr.Blocks with its queue set: `concurrency` requests run (and batch) at once, up to
    `max_queue` more wait."""
    for key, value in GRADIO_DEFAULTS.items():
        os.environ.setdefault(key, value)
    gr = require_gradio()
    pipe = service.pipe
    kind = "Token-Shuffle" if service.discrete else "CausalFusion"
    with gr.Blocks(title=f"mmfusion: {service.model_name}") as app:
        gr.Markdown(
            f"## mmfusion · `{service.model_name}`\n{kind}, {service.image_size}x{service.image_size} images "
            f"in {service.n_tokens} tokens, trained on {pipe.training_data or 'its own data'}."
        )
        with gr.Tab("Text to image"):
            _text_to_image_tab(gr, service)
        with gr.Tab("Caption"):
            _caption_tab(gr, service)
        with gr.Tab("Edit"):
            _edit_tab(gr, service)
    # queue positions sent to waiting pages once a second rather than on every change: under load that
    # is far fewer messages per request (docs/BENCHMARKS.md)
    return app.queue(max_size=max_queue, default_concurrency_limit=concurrency, status_update_rate=1.0)


def build_server(service: Service, max_queue: int = 64, concurrency: int = 8) -> Any:
    """Everything `mmfusion serve` serves, as one FastAPI app: the JSON API under /v1
    (`mmfusion.serving.rest`, its schema at /v1/docs) and the page at /, on one service and worker."""
    gr = require_gradio()
    from fastapi import FastAPI

    from mmfusion.serving.rest import add_routes

    api = FastAPI(
        title=f"mmfusion: {service.model_name}", docs_url="/v1/docs", redoc_url=None, openapi_url="/v1/openapi.json"
    )
    add_routes(api, service)
    page = build_app(service, max_queue=max_queue, concurrency=concurrency)
    return gr.mount_gradio_app(api, page, path="/", css=CSS, show_error=True)


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when `host:port` cannot be listened on."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
            sock.bind(address)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err}; pick another --port") from err


def _sampler_controls(gr: Any, service: Service) -> dict[str, Any]:
    """The image sampler's controls, named by its settings' fields, at the model's defaults."""
    s = service.pipe.image_settings()
    if service.discrete:
        controls = {
            "temperature": gr.Slider(0.1, 2.0, value=s.temperature, step=0.05, label="temperature"),
            "top_k": gr.Number(value=s.top_k, precision=0, minimum=0, label="top-k (0: all codes)"),
            "top_p": gr.Slider(0.05, 1.0, value=s.top_p, step=0.05, label="top-p"),
        }
    else:
        controls = {
            "ar_steps": gr.Slider(
                1, service.n_tokens, value=s.ar_steps, step=1, label="AR steps (1: all tokens at once)"
            ),
            "order": gr.Radio(["random", "raster", "block_raster"], value=s.order, label="token order"),
            "sampler": gr.Radio(["ddpm", "ddim"], value=s.sampler, label="sampler"),
            "steps": gr.Slider(1, MAX_STEPS, value=s.steps, step=1, label="denoising steps per AR step"),
            "temperature": gr.Slider(
                0.0, 1.5, value=s.temperature, step=0.05, label="temperature (noise added per denoising step)"
            ),
        }
    controls["cfg_scale"] = gr.Slider(0, MAX_GUIDANCE, value=s.cfg_scale, step=0.5, label="guidance scale")
    return controls


def _prompt_box(gr: Any, service: Service, label: str = "prompt") -> Any:
    if service.pipe.condition != "text":
        names = service.pipe.class_names
        return gr.Dropdown(names, value=names[0] if names else None, label="class", allow_custom_value=True)
    return gr.Textbox(label=label, placeholder="a red circle to the left of a blue square", lines=1)


def _shapes_model(service: Service) -> bool:
    return service.pipe.training_data == "shapes" and service.pipe.condition == "text"


def _image_inputs(gr: Any, service: Service, label: str, images: int, open_sampler: bool) -> tuple:
    """The inputs of an image request (text to image, edit): (prompt, negative prompt, number of images,
    seed, the sampler's controls by setting name)."""
    prompt = _prompt_box(gr, service, label)
    negative = gr.Textbox(label="negative prompt (optional)", lines=1)
    with gr.Row():
        n = gr.Slider(1, MAX_IMAGES, value=images, step=1, label="number of images")
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
    with gr.Accordion("sampler", open=open_sampler):
        controls = _sampler_controls(gr, service)
    return prompt, negative, n, seed, controls


def _pixel_gallery(gr: Any, label: str, columns: int, elem_id: str) -> Any:
    """A gallery of the model's images as PNG (lossless), enlarged as blocks."""
    return gr.Gallery(
        label=label,
        show_label=False,
        columns=columns,
        format="png",
        elem_id=elem_id,
        elem_classes="mmf-pixels",
        height=420,
        object_fit="contain",
    )


def _png_files(gr: Any, images: list[Image.Image]) -> list[str]:
    """Each image as a PNG file in Gradio's cache folder, named by its content and written atomically
    (`write_atomic`). Handed PIL images, Gradio rewrites the file of an image it has made before in
    place, and a request still downloading that file (two users asking for the same prompt and seed)
    gets a broken response; a file that exists here is never written again."""
    folder = Path(gr.utils.get_upload_folder()) / "mmfusion"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        path = folder / f"{hashlib.sha256(data).hexdigest()}.png"
        if not path.exists():
            write_atomic(path, lambda p, data=data: p.write_bytes(data))
        paths.append(str(path))
    return paths


def _text_to_image_tab(gr: Any, service: Service) -> None:
    with gr.Row():
        with gr.Column():
            prompt, negative, n, seed, controls = _image_inputs(gr, service, "prompt", 4, open_sampler=True)
            run = gr.Button("Generate", variant="primary", elem_id="t2i-run")
        with gr.Column():
            gallery = _pixel_gallery(gr, "images (caption: the seed of each)", 4, "t2i-gallery")
            command = gr.Textbox(
                label="the same images from the command line",
                interactive=False,
                buttons=["copy"],
                elem_id="t2i-command",
            )
    names = list(controls)

    def generate(prompt_: str, negative_: str, n_: float, seed_: float, *values: Any) -> tuple[list, str]:
        options = dict(zip(names, values))
        pairs = service.text_to_image(prompt_, negative_, n_, seed_, options)
        shown = list(zip(_png_files(gr, [im for im, _ in pairs]), (f"seed {s}" for _, s in pairs)))
        return shown, service.reproduce_command(prompt_, negative_, n_, seed_, options)

    inputs = [prompt, negative, n, seed, *controls.values()]
    run.click(shown_errors(gr, generate), inputs, [gallery, command], api_name="text_to_image")
    prompt.submit(shown_errors(gr, generate), inputs, [gallery, command], api_name=False)
    if _shapes_model(service):
        gr.Examples(SHAPES_PROMPTS, [prompt, negative], label="prompts the shapes model knows")


def _caption_tab(gr: Any, service: Service) -> None:
    if not service.captions:
        gr.Markdown("This model is class-conditional: it was not trained to caption images.")
        return
    s = service.pipe.caption_settings()
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                label="image (any size: it is resized as in training)",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                elem_id="cap-image",
                elem_classes="mmf-pixels",
                height=300,
            )
            method = gr.Radio(["greedy", "beam", "nucleus"], value=s.method, label="decoding")
            with gr.Row():
                beams = gr.Slider(1, 8, value=s.num_beams, step=1, label="beams (beam search)")
                top_p = gr.Slider(0.05, 1.0, value=s.top_p, step=0.05, label="top-p (nucleus)")
                temperature = gr.Slider(0.1, 2.0, value=s.temperature, step=0.05, label="temperature (nucleus)")
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed (nucleus)")
            run = gr.Button("Caption", variant="primary", elem_id="cap-run")
        with gr.Column():
            text = gr.Textbox(label="caption", elem_id="cap-text", interactive=False)
    # the upload arrives unread (preprocess=False): the service opens it, so a file that is no image gets
    # a one-line message rather than Gradio's component error
    inputs = [image, method, beams, top_p, temperature, seed]
    run.click(shown_errors(gr, service.caption), inputs, text, api_name="caption", preprocess=False)
    if _shapes_model(service):
        gr.Examples([[p] for p in example_images(service.image_size)], [image], label="test images of the shapes data")


def _edit_tab(gr: Any, service: Service) -> None:
    if not service.edits:
        gr.Markdown("Editing redraws a region in continuous image tokens: it works on CausalFusion models only.")
        return
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(
                label="image: paint the region to redraw",
                type="pil",
                image_mode="RGBA",
                sources=["upload", "clipboard"],
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                elem_id="edit-image",
                elem_classes="mmf-pixels",
                height=360,
            )
            mask = gr.Image(
                label="or upload a mask (white: redraw; the image's size)",
                type="filepath",
                image_mode=None,
                sources=["upload"],
                height=160,
            )
            prompt, negative, n, seed, controls = _image_inputs(gr, service, "what to draw there", 2, False)
            run = gr.Button("Edit", variant="primary", elem_id="edit-run")
        with gr.Column():
            gallery = _pixel_gallery(gr, "the input as the model sees it, then the edits", 3, "edit-gallery")
    names = list(controls)

    def edit(image: Any, mask_: Any, prompt_: str, negative_: str, n_: float, seed_: float, *values: Any) -> list:
        seen, pairs = service.edit(image, mask_, prompt_, negative_, n_, seed_, dict(zip(names, values)))
        files = _png_files(gr, [seen, *(im for im, _ in pairs)])
        return list(zip(files, ["input", *(f"seed {s}" for _, s in pairs)]))

    inputs = [editor, mask, prompt, negative, n, seed, *controls.values()]
    run.click(shown_errors(gr, edit), inputs, gallery, api_name="edit", preprocess=False)  # read by the service
    if _shapes_model(service):
        image, mask_file, text = edit_example(service.image_size)
        gr.Examples(
            [[image, mask_file, text, ""]],
            [editor, mask, prompt, negative],
            label="an image, a mask of its left half, the new scene",
        )


@functools.cache
def example_images(size: int) -> list[str]:
    """Files of a few shapes test images (one and two objects), written once per process."""
    folder = Path(tempfile.mkdtemp(prefix="mmfusion-serve-"))
    paths = []
    for i in range(4):
        path = folder / f"shapes_{i}.png"
        render_example(0, "test", i, size)["image"].save(path)
        paths.append(str(path))
    return paths


@functools.cache
def edit_example(size: int) -> tuple[str, str, str]:
    """(image file, mask file, prompt): the first shapes test image of two objects side by side, a mask
    of its left half, and a prompt naming the right object beside a new left one."""
    for i in range(64):
        ex = render_example(0, "test", i, size)
        if ex["relation"] in ("to the left of", "to the right of"):
            break
    right, left = sorted(ex["objects"], key=lambda o: -o["cx"])
    new = "red circle" if (left["colour"], left["shape"]) != ("red", "circle") else "blue square"
    prompt = f"a {right['colour']} {right['shape']} to the right of a {new}"
    folder = Path(example_images(size)[0]).parent
    ex["image"].save(folder / "edit_example.png")
    m = np.zeros((size, size), dtype=np.uint8)
    m[:, : size // 2] = 255
    Image.fromarray(m).save(folder / "edit_example_mask.png")
    return str(folder / "edit_example.png"), str(folder / "edit_example_mask.png"), prompt
