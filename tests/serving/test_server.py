"""The served page through gradio_client, as a program (or the page) calls it: every endpoint returns
what the Python API returns for the same seed; bad input comes back as its message, a full queue as a
busy message at once, and the server goes on serving."""

import os
import time
from pathlib import Path

import gradio_client
import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import at_once

# AR steps, order, sampler, steps, guidance: the page's sampler controls in order
SAMPLER = [2, "raster", "ddpm", 4, 0.5, 2.0]  # AR steps, order, sampler, steps, temperature, guidance
EDIT_SAMPLER = dict(ar_steps=2, order="raster", steps=4, cfg_scale=2.0, temperature=0.5)  # SAMPLER, by name
API_SAMPLER = dict(
    guidance_scale=2.0, ar_steps=2, order="raster", sampler="ddpm", num_inference_steps=4, temperature=0.5
)


def pixels(path_or_image):
    im = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False, download_files=False)


def gallery_images(gallery):
    return [pixels(item["image"]["path"] if isinstance(item["image"], dict) else item["image"]) for item in gallery]


@pytest.fixture(scope="module")
def files_client(served, tmp_path_factory):
    return gradio_client.Client(served[1], verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))


def test_text_to_image_endpoint_equals_the_api(files_client, tiny_pipe):
    gallery, command = files_client.predict("a red circle", "", 3, 11, *SAMPLER, api_name="/text_to_image")
    assert [item["caption"] for item in gallery] == ["seed 11", "seed 12", "seed 13"]
    api = tiny_pipe("a red circle", num_images_per_prompt=3, seed=11, **API_SAMPLER).images
    served = gallery_images(gallery)
    assert len(served) == 3 and all(np.array_equal(a, pixels(b)) for a, b in zip(served, api))
    assert "--seed 11 --num-images 3" in command


def test_caption_endpoint_equals_the_api(files_client, tiny_pipe, tmp_path):
    image = tiny_pipe.generate("a blue square", seed=2)[0].resize((90, 90)).convert("RGBA")
    path = tmp_path / "upload.png"
    image.save(path)
    for method in ("greedy", "beam"):
        served = files_client.predict(gradio_client.handle_file(str(path)), method, 2, 0.9, 1.0, 0, api_name="/caption")
        from mmfusion.image_io import to_rgb

        assert served == tiny_pipe.caption(to_rgb(Image.open(path)), method=method, num_beams=2)[0]


def test_edit_endpoint_equals_the_api(files_client, tiny_pipe, tmp_path):
    src = tiny_pipe.generate("a red circle", seed=0)[0]
    src.save(tmp_path / "src.png")
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (16, 0, 32, 32))  # the right half painted
    layer.save(tmp_path / "layer.png")
    editor = {
        "background": gradio_client.handle_file(str(tmp_path / "src.png")),
        "layers": [gradio_client.handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
    }
    gallery = files_client.predict(editor, None, "a blue square", "", 2, 3, *SAMPLER, api_name="/edit")
    assert [item["caption"] for item in gallery] == ["input", "seed 3", "seed 4"]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    api = tiny_pipe.edit(src, mask, "a blue square", seed=3, num_images=2, **EDIT_SAMPLER)
    served = gallery_images(gallery)
    assert np.array_equal(served[0], pixels(src))
    assert all(np.array_equal(a, pixels(b)) for a, b in zip(served[1:], api))


def test_bad_input_shows_its_message_and_the_server_goes_on(client, tmp_path):
    AppError = gradio_client.exceptions.AppError
    with pytest.raises(AppError, match="enter a prompt"):
        client.predict("", "", 1, 0, *SAMPLER, api_name="/text_to_image")
    with pytest.raises(AppError, match="99 is greater than maximum value 16"):  # the slider's own check
        client.predict("a red circle", "", 99, 0, *SAMPLER, api_name="/text_to_image")
    with pytest.raises(AppError, match="denoising steps must be a whole number"):
        client.predict("a red circle", "", 1, 0, 2, "raster", "ddpm", 4.5, 1.0, 2.0, api_name="/text_to_image")
    with pytest.raises(AppError, match="upload an image to caption"):
        client.predict(None, "greedy", 2, 0.9, 1.0, 0, api_name="/caption")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    with pytest.raises(AppError, match="cannot read"):
        client.predict(gradio_client.handle_file(str(junk)), "greedy", 2, 0.9, 1.0, 0, api_name="/caption")
    gallery, _ = client.predict("a red circle", "", 1, 0, *SAMPLER, api_name="/text_to_image")
    assert len(gallery) == 1


def test_a_full_queue_answers_busy_at_once(trained_tiny, tiny_pipe):
    """One request runs, one waits; the rest are told the queue is full, in well under a second, and the
    two accepted ones complete."""
    from mmfusion.serving.service import Service

    service = Service(tiny_pipe, str(trained_tiny))
    slow = [16, "raster", "ddpm", 40, 1.0, 2.0]  # long enough that the first two are still there

    def call(url, i):
        c = gradio_client.Client(url, verbose=False, download_files=False)
        start = time.monotonic()
        try:
            c.predict("a red circle", "", 8, i, *slow, api_name="/text_to_image")
            return "done", time.monotonic() - start
        except Exception as err:  # noqa: BLE001 - the message is what is checked
            return str(err), time.monotonic() - start

    results = at_once(service, 5, call, max_queue=1, concurrency=1)
    done = [r for r in results if r[0] == "done"]
    busy = [r for r in results if "Queue is full" in r[0]]
    assert len(done) >= 1 and len(done) + len(busy) == 5, results
    assert busy and all(seconds < 2.0 for _, seconds in busy), results


def test_the_load_benchmark_client_gets_whole_answers_and_renders_them(served, tiny_pipe, tmp_path):
    """The `serve` bench item's HTTP client (Gradio's documented call / event-stream API): every request
    comes back with its own seeds and the API's images, captions come back for uploaded files, and the
    table shows the counts."""
    from benchmarks import bench

    _, url = served
    jobs = [["a red circle", "", 2, 10 * k, *SAMPLER] for k in range(4)]
    _, got = bench._client_load(url, jobs, 2, "text_to_image")
    assert [[item["caption"] for item in r[0]] for _, r in got] == [
        [f"seed {10 * k}", f"seed {10 * k + 1}"] for k in range(4)
    ]
    assert all(sec > 0 for sec, _ in got)
    image = tiny_pipe.generate("a green square", seed=4)[0]
    path = str(tmp_path / "upload.png")
    image.save(path)
    uploads = bench._uploaded(url, [[{"path": path, "meta": {"_type": "gradio.FileData"}}, "greedy", 1, 0.9, 1.0, 0]])
    _, captions = bench._client_load(url, uploads, 1, "caption")
    assert captions[0][1][0] == tiny_pipe.caption(image)[0]
    row = {"complete": 4, "p50_s": 0.1, "p95_s": 0.2, "server_per_s": 8.0, "api_per_s": 10.0, "ratio": 0.8}
    row |= {"clients_batch": 2, "api_clients_batch_per_s": 9.0}
    own = {"method": "beam", "num_beams": 3, "rerank_weight": 30.0}
    results = {"requests": 4, "clients": 2, "steps": 4, "json_t2i_1": row, "json_caption_own": row, "own_decoding": own}
    text = "\n".join(bench._serve_rows(results, bench._fmt))
    assert (
        "| text to image, 1 image a request (JSON API) | 4 of 4 | 0.1 | 0.2 | 8 | 10 | 80% | 9 (batch 2) | 89% |"
        in text
    )
    own_decoding = "the model's own decoding (beam 3, candidates checked by redrawing)"
    assert f"| caption, 1 image a request, {own_decoding} (JSON API) | 4 of 4 |" in text
    assert "the page's API" not in text  # a kind the run did not measure has no row


def test_the_same_images_asked_for_at_once_come_back_whole(served, tiny_pipe):
    """Many clients asking for the same prompt and seeds at once (a demo's example prompt): every answer
    is whole and holds the API's images. Gradio rewrote the file of an image it had made before in place,
    under a download of that file, which failed the download ("Too much data for declared
    Content-Length")."""
    from benchmarks import bench

    _, url = served
    jobs = [["a red circle", "", 2, 5, *SAMPLER] for _ in range(24)]
    _, got = bench._client_load(url, jobs, 6, "text_to_image")
    assert [[item["caption"] for item in r[0]] for _, r in got] == [["seed 5", "seed 6"]] * 24
    paths = {item["image"]["path"] for _, r in got for item in r[0]}
    assert len(paths) == 2  # one file per distinct image, shared by every answer
    api = tiny_pipe("a red circle", num_images_per_prompt=2, seed=5, **API_SAMPLER).images
    for item, image in zip(got[0][1][0], api):
        assert np.array_equal(pixels(item["image"]["path"]), pixels(image))


def test_gallery_files_are_written_once_and_whole(tmp_path, monkeypatch):
    """An image's file is named by its content, written under another name and renamed into place, and
    never written again: a second request for the same image gets the same file, untouched."""
    import gradio as gr

    from mmfusion.serving.app import _png_files

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    first = _png_files(gr, [red, blue])
    before = [(p, os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in first]
    time.sleep(0.01)
    again = _png_files(gr, [red])
    assert again == first[:1] and len(set(first)) == 2
    assert [(p, os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in first] == before
    assert all(p.startswith(str(tmp_path)) for p in first)
    assert np.array_equal(pixels(first[1]), pixels(blue))
    assert sorted(f.name for f in (tmp_path / "mmfusion").iterdir()) == sorted(Path(p).name for p in first)
