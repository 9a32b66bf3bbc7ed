"""The JSON API beside the page (`/v1/...`), called over HTTP as a script calls it: each endpoint returns
what the Python API returns for the same seed, a bad input is answered 400 / 422 with one line, a full
server 503 at once, and the server goes on serving."""

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from mmfusion.image_io import to_rgb

OPTIONS = {"ar_steps": 2, "order": "raster", "sampler": "ddpm", "steps": 4, "cfg_scale": 2.0, "temperature": 0.5}


def b64(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def unpack(data):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[1], timeout=120) as client:
        yield client


def test_generate_returns_the_apis_images_with_their_seeds(http, tiny_pipe):
    r = http.post("v1/generate", json={"prompt": "a red circle", "num_images": 3, "seed": 11, **OPTIONS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [item["seed"] for item in body["images"]] == [11, 12, 13]
    api = tiny_pipe.generate("a red circle", seed=11, num_images=3, **OPTIONS)
    assert all(same(unpack(item["png"]), im) for item, im in zip(body["images"], api))
    assert "--seed 11 --num-images 3" in body["command"] and "--steps 4" in body["command"]


def test_caption_of_any_mode_and_size_equals_the_api(http, tiny_pipe):
    image = tiny_pipe.generate("a blue square", seed=2)[0].resize((90, 70)).convert("RGBA")
    for method, fmt in (("greedy", "PNG"), ("beam", "WEBP")):
        sent = b64(image, fmt)
        r = http.post("v1/caption", json={"image": sent, "method": method, "num_beams": 2})
        assert r.status_code == 200, r.text
        want = tiny_pipe.caption(to_rgb(Image.open(io.BytesIO(base64.b64decode(sent)))), method=method, num_beams=2)
        assert r.json() == {"caption": want[0]}
    data_url = "data:image/png;base64," + b64(image)  # as a browser's FileReader gives it
    assert http.post("v1/caption", json={"image": data_url}).json() == {"caption": tiny_pipe.caption(to_rgb(image))[0]}


def test_a_list_of_images_is_captioned_as_the_api_captions_it_with_seeds_in_turn(http, tiny_pipe):
    images = [tiny_pipe.generate(p, seed=1)[0] for p in ("a red circle", "a blue square", "a green triangle")]
    r = http.post("v1/caption", json={"images": [b64(im) for im in images], "method": "nucleus", "seed": 5})
    assert r.status_code == 200, r.text
    assert r.json() == {"captions": tiny_pipe.caption(images, seed=5, method="nucleus")}
    one = http.post("v1/caption", json={"image": b64(images[2]), "method": "nucleus", "seed": 7}).json()
    assert one == {"caption": r.json()["captions"][2]}  # image k of a list is drawn with seed + k
    assert tiny_pipe.caption(images, seed=6, method="nucleus") != r.json()["captions"]  # the seed matters


def test_edit_returns_the_input_as_seen_and_the_apis_edits(http, tiny_pipe):
    src = tiny_pipe.generate("a red circle", seed=0)[0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    req = {"image": b64(src), "mask": b64(mask), "prompt": "a blue square", "num_images": 2, "seed": 3, **OPTIONS}
    r = http.post("v1/edit", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert same(unpack(body["input"]), src.convert("RGB"))
    assert [item["seed"] for item in body["images"]] == [3, 4]
    api = tiny_pipe.edit(src, mask, "a blue square", seed=3, num_images=2, **OPTIONS)
    assert all(same(unpack(item["png"]), im) for item, im in zip(body["images"], api))


def test_model_info_names_the_tasks_and_the_samplers_settings(http, tiny_pipe):
    info = http.get("v1/model").json()
    assert info["kind"] == "causalfusion" and info["tasks"] == ["generate", "caption", "edit"]
    assert info["image_size"] == 32 and info["image_settings"]["steps"] == tiny_pipe.image_settings().steps
    assert set(info["image_settings"]) == {"ar_steps", "order", "sampler", "steps", "cfg_scale", "temperature"}
    assert http.get("v1/docs").status_code == 200 and "/v1/generate" in http.get("v1/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("v1/generate", {"prompt": "  "}, 400, "enter a prompt"),
        ("v1/generate", {"prompt": "a red circle", "num_images": 99}, 400, "number of images must be between 1"),
        ("v1/generate", {"prompt": "a red circle", "top_k": 5}, 400, "top_k: not a setting of CausalFusion"),
        ("v1/generate", {"prompt": "a red circle", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ("v1/generate", {"prompt": "a red circle", "steps": "many"}, 422, "steps: Input should be a valid integer"),
        ("v1/caption", {"image": "not base64!"}, 400, "image is not base64"),
        ("v1/caption", {"image": base64.b64encode(b"\x89PNG but not").decode()}, 400, "cannot read image"),
        ("v1/caption", {}, 400, 'send "image" (one base64 image file) or "images"'),
        ("v1/caption", {"images": []}, 400, "send 1 to 16 images"),
        ("v1/caption", {"images": ["", "x"]}, 400, "send images[0]"),
        ("v1/caption", {"images": ["x"] * 17}, 422, "images: List should have at most 16 items"),
        ("v1/caption", {"image": "x", "images": ["x"]}, 400, 'send "image" or "images", not both'),
        ("v1/edit", {"image": "", "mask": "", "prompt": "a red circle"}, 400, "send image"),
    ],
)
def test_bad_input_is_one_line_and_the_server_goes_on(http, path, body, status, message):
    r = http.post(path, json=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]
    assert http.post("v1/generate", json={"prompt": "a red circle", "steps": 2}).status_code == 200


def test_what_is_no_request_of_the_api_is_answered_in_its_style(http):
    r = http.post("v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("the body is not JSON")
    r = http.get("v1/generate")
    assert r.status_code == 405 and r.json() == {"error": "/v1/generate takes POST"}
    r = http.post("v1/genrate", json={"prompt": "a red circle"})
    assert r.status_code == 404 and "no endpoint /v1/genrate; the endpoints: GET /v1/model" in r.json()["error"]
    assert http.get("").status_code == 200  # the page is still at /


def test_line_wrapped_base64_as_the_base64_command_writes_it_is_read(http, tiny_pipe):
    image = tiny_pipe.generate("a red circle", seed=3)[0]
    plain = b64(image)
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)) + "\n"
    assert http.post("v1/caption", json={"image": wrapped}).json() == {"caption": tiny_pipe.caption(image)[0]}


def test_a_mask_of_another_size_is_refused(http):
    image, mask = Image.new("RGB", (32, 32)), Image.new("L", (16, 16), 255)
    r = http.post("v1/edit", json={"image": b64(image), "mask": b64(mask), "prompt": "a red circle"})
    assert r.status_code == 400 and "upload a mask of the image's size" in r.json()["error"]


def test_past_the_bound_requests_are_answered_busy_at_once(trained_tiny, tiny_pipe):
    """The API's own bound, below the worker's: two requests may be held (one running, one waiting); of
    six sent at once the others get 503 with Retry-After well under a second, and every accepted one
    completes. (Without the API's bound all six would wait for a thread and complete.)"""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI

    from mmfusion.serving.rest import add_routes
    from mmfusion.serving.service import Service
    from tests.serving.conftest import Running

    service = Service(tiny_pipe, str(trained_tiny), max_pending=64)
    app = FastAPI()
    add_routes(app, service, bound=2)
    running = Running(app)
    slow = {"prompt": "a red circle", "num_images": 8, **OPTIONS, "ar_steps": 16, "steps": 40}

    def call(i):
        start = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{running.port}/v1/generate", json={**slow, "seed": i}, timeout=120)
        return r.status_code, r.headers.get("retry-after"), r.json(), time.monotonic() - start

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
    finally:
        running.close()
        service.close()
    done = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert 1 <= len(done) <= 2 and len(done) + len(busy) == 6, [r[:2] for r in results]
    assert all(len(r[2]["images"]) == 8 for r in done)
    assert all(r[1] == "1" and "the server is busy: 2 requests" in r[2]["error"] and r[3] < 2.0 for r in busy)


def test_the_load_benchmark_json_client_gets_whole_answers(served, tiny_pipe):
    """The `serve` bench item's JSON client: each request comes back with its own seeds and images."""
    from benchmarks import bench

    _, url = served
    jobs = [{"prompt": "a red circle", "num_images": 2, "seed": 10 * k, **OPTIONS} for k in range(4)]
    _, got = bench._client_load(url, jobs, 2, "v1/generate")
    assert [[item["seed"] for item in r["images"]] for _, r in got] == [[10 * k, 10 * k + 1] for k in range(4)]
    api = tiny_pipe.generate("a red circle", seed=30, num_images=2, **OPTIONS)
    assert all(same(unpack(item["png"]), im) for item, im in zip(got[3][1]["images"], api))
    with pytest.raises(RuntimeError, match="400"):
        bench._client_load(url, [{"prompt": ""}], 1, "v1/generate")


def test_readme_json_api_snippet_runs_as_written(served, tiny_pipe, tmp_path, monkeypatch, capsys):
    """The README's JSON API block against the tiny model's server (its address put in for the README's),
    with a photo.jpg to caption: two images with the seeds it names, and the API's caption printed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "/generate" in block]
    assert "http://127.0.0.1:7860/v1" in code
    photo = tiny_pipe.generate("a green triangle", seed=1)[0].resize((64, 48))
    photo.save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("http://127.0.0.1:7860/", served[1]), "README.md", "exec"), scope)  # noqa: S102
    want = tiny_pipe.generate("a red circle", seed=7, num_images=2, steps=50)
    assert len(scope["pngs"]) == 2
    assert all(same(Image.open(io.BytesIO(png)).convert("RGB"), im) for png, im in zip(scope["pngs"], want))
    caption = tiny_pipe.caption(to_rgb(Image.open(tmp_path / "photo.jpg")), method="beam")[0]
    assert capsys.readouterr().out.strip() == caption
