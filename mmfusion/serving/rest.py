"""The JSON API that `mmfusion serve` offers beside the page, for programs: one POST, one JSON answer.

    GET  /v1/model      what the model is and which tasks and settings it takes
    POST /v1/generate   {"prompt", "negative_prompt", "num_images", "seed", sampler settings by name}
    POST /v1/caption    {"image": base64 image file (or "images": a list), "method", "num_beams", "top_p",
                         "temperature", "seed"}
    POST /v1/edit       {"image", "mask" (base64; white = redraw), "prompt", ... as /v1/generate}

Images travel base64-encoded (any format PIL reads on the way in; PNG on the way out), each returned
image with its seed. The page's own HTTP API (Gradio's) takes two round trips and an event stream per
call; this one takes one request, which is what a script or a load balancer in front of several servers
wants. Both go through the same `Service`: the same checks, and the same worker, so a JSON request and
a page request with the same settings share a batch. A bad input is answered 400, a full server 503
(with Retry-After), each with {"error": one line}. The schema is served at /v1/docs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mmfusion.errors import UserError
from mmfusion.image_io import read_image
from mmfusion.serving.batcher import Busy
from mmfusion.serving.service import MAX_IMAGES, Service


def encode_png(image: Image.Image) -> str:
    """An image as base64 PNG, as the API returns images."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str | None, what: str) -> Image.Image:
    """A base64 image file (or a data URL) in its own mode, or a one-line error naming `what`."""
    if not data:
        raise UserError(f"send {what}: a base64-encoded image file")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)  # line-wrapped base64 too
    except (binascii.Error, ValueError) as err:
        raise UserError(f"{what} is not base64: send the image file's bytes base64-encoded") from err
    return read_image(io.BytesIO(raw), what)


class Sampler(BaseModel):
    """The image sampler's settings by name; None (or left out) keeps the model's own."""

    model_config = ConfigDict(extra="forbid")
    ar_steps: int | None = None
    order: str | None = None
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


class GenerateRequest(Sampler):
    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int = 0


class EditRequest(GenerateRequest):
    image: str
    mask: str


class CaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = None  # one image -> {"caption": ...}
    images: list[str] | None = Field(None, max_length=MAX_IMAGES)  # -> {"captions": [...]}, image k: seed + k
    method: str | None = None  # None (or left out): the model's own decoding settings
    num_beams: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int = 0


def _images(pairs: list[tuple[Image.Image, int]]) -> list[dict[str, Any]]:
    return [{"seed": seed, "png": encode_png(image)} for image, seed in pairs]


def model_info(service: Service) -> dict[str, Any]:
    """What `GET /v1/model` answers: the model, its tasks, and the settings its sampler starts from."""
    tasks = ["generate"] + ["caption"] * service.captions + ["edit"] * service.edits
    return {
        "model": service.model_name,
        "kind": "token-shuffle" if service.discrete else "causalfusion",
        "image_size": service.image_size,
        "image_tokens": service.n_tokens,
        "tasks": tasks,
        "image_settings": {  # the ones a request can change
            k: v for k, v in dataclasses.asdict(service.pipe.image_settings()).items() if k in Sampler.model_fields
        },
    }


ENDPOINTS = {"/v1/model": "GET", "/v1/generate": "POST", "/v1/caption": "POST", "/v1/edit": "POST"}


def add_routes(app: Any, service: Service, bound: int | None = None) -> None:
    """The /v1 routes on the FastAPI `app`, and the handlers that turn errors into {"error": ...}.

    Each request is handled on a thread of its own, at most `bound` at once (default: as many as the
    worker may hold, `max_pending`); one more is answered 503 at once rather than left waiting for a
    thread."""
    import anyio

    bound = bound or service.worker.max_pending
    limiter, held = anyio.CapacityLimiter(bound), [0]

    async def on_thread(fn: Any, req: Any) -> dict:
        # counted before the first await: requests arriving together cannot all pass the check
        if held[0] >= bound:
            raise Busy(bound)
        held[0] += 1
        try:
            return await anyio.to_thread.run_sync(fn, service, req, limiter=limiter)
        finally:
            held[0] -= 1

    @app.get("/v1/model")
    def model() -> dict:
        return model_info(service)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict:
        return await on_thread(_generate, req)

    @app.post("/v1/caption")
    async def caption(req: CaptionRequest) -> dict:
        return await on_thread(_caption, req)

    @app.post("/v1/edit")
    async def edit(req: EditRequest) -> dict:
        return await on_thread(_edit, req)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def elsewhere(path: str) -> None:  # else the page, mounted at /, would answer
        endpoint = f"/v1/{path.rstrip('/')}"
        if endpoint in ENDPOINTS:
            raise _Refused(405, f"{endpoint} takes {ENDPOINTS[endpoint]}")
        known = ", ".join(f"{method} {e}" for e, method in ENDPOINTS.items())
        raise _Refused(404, f"no endpoint /v1/{path}; the endpoints: {known}")

    _error_handlers(app)


class _Refused(UserError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_handlers(app: Any) -> None:
    """Every error of a /v1 request answered as {"error": one line}: 400 for a bad input, 422 for a
    body that does not parse, 503 (with Retry-After) when the server is full, 500 for a failure."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    def answer(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.exception_handler(Busy)
    def busy(_request: Any, err: Busy) -> JSONResponse:
        return answer(503, str(err), **{"Retry-After": "1"})

    @app.exception_handler(UserError)
    def bad_input(_request: Any, err: UserError) -> JSONResponse:
        return answer(getattr(err, "status", 400), str(err))

    @app.exception_handler(RequestValidationError)
    def bad_request(_request: Any, err: RequestValidationError) -> JSONResponse:
        return answer(422, "; ".join(_problem(e) for e in err.errors()))

    @app.exception_handler(Exception)
    def failed(_request: Any, err: Exception) -> JSONResponse:
        return answer(500, f"the server failed on this request: {type(err).__name__}: {err}")


def _problem(error: dict[str, Any]) -> str:
    """One of pydantic's validation errors as `field: what is wrong`."""
    if error.get("type") == "json_invalid":
        return f"the body is not JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    where = ".".join(str(p) for p in error["loc"] if p != "body") or "the request body"
    return f"{where}: {error['msg']}"


def _options(req: Sampler) -> dict[str, Any]:
    return {name: getattr(req, name) for name in Sampler.model_fields}


def _generate(service: Service, req: GenerateRequest) -> dict:
    args = (req.prompt, req.negative_prompt, req.num_images, req.seed, _options(req))
    pairs = service.text_to_image(*args)
    return {"images": _images(pairs), "command": service.reproduce_command(*args)}


def _caption(service: Service, req: CaptionRequest) -> dict:
    if req.image is None and req.images is None:
        raise UserError('send "image" (one base64 image file) or "images" (a list of them)')
    if req.image is not None and req.images is not None:
        raise UserError('send "image" or "images", not both')
    many = req.images is not None
    sent = req.images if many else [req.image]
    images = [decode_image(data, f"images[{k}]" if many else "image") for k, data in enumerate(sent)]
    texts = service.captions_of(images, req.method, req.num_beams, req.top_p, req.temperature, req.seed)
    return {"captions": texts} if many else {"caption": texts[0]}


def _edit(service: Service, req: EditRequest) -> dict:
    image, mask = decode_image(req.image, "image"), decode_image(req.mask, "mask")
    seen, pairs = service.edit(image, mask, req.prompt, req.negative_prompt, req.num_images, req.seed, _options(req))
    return {"input": encode_png(seen), "images": _images(pairs)}
