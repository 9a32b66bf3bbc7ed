"""`mmfusion serve`: the web demo."""

# Deferred imports: Gradio and the library load when the command runs, so `--help` stays instant

from __future__ import annotations

from typing import Literal


def serve(
    *,
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_queue: int = 64,
    concurrency: int = 8,
    max_batch: int = 16,
    adapter: list[str] | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "auto",
    revision: str | None = None,
    compile: bool = False,
) -> None:
    """Serve a web demo of the model: text to image, captions and editing, one tab each (Gradio; install
    it with pip install -e ".[serve]"). Open http://HOST:PORT in a browser; Ctrl-C stops the server.

    Requests from several people queue: `--concurrency` of them run at once, their images and captions
    batched together where the settings agree (up to `--max-batch` samples per model call), and up to
    `--max-queue` more wait; past that the page says the server is busy. Each image is shown with its
    seed, and the page gives the `mmfusion generate` command that draws the same images. Programs can
    skip the page: POST JSON to /v1/generate, /v1/caption or /v1/edit (one request, one answer, images
    as base64 PNG; the schema is at /v1/docs). JSON requests share the model's batches with the page's;
    up to --max-queue + --concurrency of them are held at once, and one more is answered 503 (busy).

    Args:
        host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network interface)
        port: the port to listen on
        max_queue: requests that may wait for a turn; one more is refused with a busy message
        concurrency: requests handled at once (their samples are batched together)
        max_batch: samples per model call
        compile: torch.compile the model before serving: more images and captions a second, after a
            compile at start (shorter once inductor's cache on disk holds it; docs/BENCHMARKS.md); needs
            g++ on CPU
    """
    from mmfusion.cli.infer import _load

    _check(host, port, max_queue, concurrency, max_batch)
    pipe = _load(model, adapter, dtype, device, revision)
    if compile:
        print("compiling the model before serving (later starts read inductor's cache) ...")
        pipe.compile(warm_up=True)
    _run(pipe, model, host, port, max_queue, concurrency, max_batch)


def _check(host: str, port: int, max_queue: int, concurrency: int, max_batch: int) -> None:
    """The options, the [serve] extra and the port, checked before the model loads."""
    from mmfusion.errors import require
    from mmfusion.serving.app import check_port, require_gradio

    require(
        [
            (1 <= port <= 65535, f"--port must be within 1..65535, got {port}"),
            (
                max_queue >= 1 and concurrency >= 1 and max_batch >= 1,
                "--max-queue, --concurrency and --max-batch must be at least 1",
            ),
        ]
    )
    require_gradio()  # a missing extra is said at once
    check_port(host, port)


def _run(pipe: object, model: str, host: str, port: int, max_queue: int, concurrency: int, max_batch: int) -> None:
    import uvicorn

    from mmfusion.serving.app import build_server
    from mmfusion.serving.service import Service

    service = Service(pipe, model, max_batch, max_queue + concurrency)
    app = build_server(service, max_queue=max_queue, concurrency=concurrency)
    url = f"http://{host}:{port}"
    print(f"serving {model} at {url} (the page), {url}/v1 (the JSON API; its schema: {url}/v1/docs); Ctrl-C stops")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        service.close()
