"""The web demo's requests without the page: the same outputs as the Python API, batched across
concurrent requests, and a one-line message for every bad input."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mmfusion.errors import UserError
from mmfusion.image_io import to_rgb
from mmfusion.serving.service import Service

OPTIONS = {"ar_steps": 2, "order": "raster", "sampler": "ddpm", "steps": 4, "cfg_scale": 2.0}


def same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def service(trained_tiny, tiny_pipe):
    s = Service(tiny_pipe, str(trained_tiny))
    yield s
    s.close()


def test_text_to_image_equals_the_api_and_concurrent_requests_share_batches(service, tiny_pipe):
    prompts = ["a red circle", "a blue square above a red circle", "a green triangle", "a red square"]
    # four people at once, two images each, seeds 10.. / 20.. / ...
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(service.text_to_image, p, "", 2, 10 * (i + 1), OPTIONS) for i, p in enumerate(prompts)]
        served = [j.result(120) for j in jobs]
    assert service.worker.stats.batches < service.worker.stats.requests  # some requests shared a model call
    for i, (prompt, pairs) in enumerate(zip(prompts, served)):
        assert [s for _, s in pairs] == [10 * (i + 1), 10 * (i + 1) + 1]
        api = tiny_pipe(
            prompt,
            num_images_per_prompt=2,
            seed=10 * (i + 1),
            num_inference_steps=4,
            guidance_scale=2.0,
            ar_steps=2,
            order="raster",
        ).images
        assert all(same(a, b) for (a, _), b in zip(pairs, api))
    # a negative prompt reaches the sampler
    neg = service.text_to_image("a red circle", "a blue square", 1, 3, OPTIONS)[0][0]
    api = tiny_pipe(
        "a red circle",
        negative_prompt="a blue square",
        seed=3,
        num_inference_steps=4,
        guidance_scale=2.0,
        ar_steps=2,
        order="raster",
    ).images[0]
    assert same(neg, api)


def test_the_reproduce_command_names_every_setting(service):
    cmd = service.reproduce_command("a red circle", "", 2, 7, OPTIONS)
    assert cmd.startswith("mmfusion generate --model ") and "--prompt 'a red circle' --seed 7 --num-images 2" in cmd
    assert "--ar-steps 2 --order raster --sampler ddpm --steps 4 --cfg 2.0" in cmd


@pytest.mark.parametrize(
    ("prompt", "n", "seed", "changes", "message"),
    [
        ("", 1, 0, {}, "enter a prompt"),
        ("   ", 1, 0, {}, "enter a prompt"),
        ("a red circle", 0, 0, {}, "number of images must be between 1 and 16"),
        ("a red circle", 2.5, 0, {}, "number of images must be a whole number"),
        ("a red circle", 1, -1, {}, "seed must be between"),
        ("a red circle", 1, 0, {"ar_steps": 99}, "AR steps must be between 1 and 16"),
        ("a red circle", 1, 0, {"steps": 0}, "denoising steps must be between 1 and 1000"),
        ("a red circle", 1, 0, {"cfg_scale": 100}, "guidance scale must be between 0 and 30"),
        ("a red circle", 1, 0, {"order": "spiral"}, "order: must be one of"),
    ],
)
def test_bad_text_to_image_input_is_one_line_and_the_service_goes_on(service, prompt, n, seed, changes, message):
    with pytest.raises(UserError, match=message):
        service.text_to_image(prompt, "", n, seed, {**OPTIONS, **changes})
    assert len(service.text_to_image("a red circle", "", 1, 0, OPTIONS)) == 1


def test_captions_equal_the_api_for_any_image_mode_and_size(service, tiny_pipe, tmp_path):
    image = tiny_pipe.generate("a red circle", seed=1)[0]
    big_rgba = image.resize((97, 61)).convert("RGBA")
    big_rgba.putalpha(200)
    gray = image.convert("L")
    for im in (image, big_rgba, gray):
        path = tmp_path / f"{im.mode}.png"
        im.save(path)
        for method in ("greedy", "beam", "nucleus"):
            served = service.caption(str(path), method, 2, 0.9, 1.0, 5)
            # the API on the same image converted as training converts images
            api = tiny_pipe.caption(to_rgb(Image.open(path)), method=method, num_beams=2, seed=5, top_p=0.9)
            assert served == api[0], (im.mode, method)


def test_bad_caption_input(service, tmp_path):
    with pytest.raises(UserError, match="upload an image to caption"):
        service.caption(None)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read uploaded file .*junk.png"):
        service.caption(str(junk))
    with pytest.raises(UserError, match="beams must be between 1 and 16"):
        service.caption(Image.new("RGB", (8, 8)), "beam", 0)


def test_edit_equals_the_api_with_a_painted_or_uploaded_mask(service, tiny_pipe, tmp_path):
    src = tiny_pipe.generate("a red circle", seed=0)[0].resize((64, 64), Image.NEAREST)  # the page's image, any size
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 32, 32))  # painted: the top-left quarter
    seen, pairs = service.edit(
        {"background": src, "layers": [layer], "composite": None}, None, "a blue square", "", 2, 4, OPTIONS
    )
    small_mask = np.zeros((32, 32), np.uint8)
    small_mask[:16, :16] = 255
    api = tiny_pipe.edit(
        src,
        Image.fromarray(small_mask),
        "a blue square",
        seed=4,
        num_images=2,
        ar_steps=2,
        order="raster",
        steps=4,
        cfg_scale=2.0,
    )
    assert seen.size == (32, 32) and [s for _, s in pairs] == [4, 5]
    assert all(same(a, b) for (a, _), b in zip(pairs, api))
    # the same mask uploaded as a file of the image's size, white = redraw
    mask_file = tmp_path / "mask.png"
    Image.fromarray(np.kron(small_mask, np.ones((2, 2), np.uint8))).save(mask_file)
    _, uploaded = service.edit(src, str(mask_file), "a blue square", "", 2, 4, OPTIONS)
    assert all(same(a, b) for (a, _), b in zip(uploaded, api))


def test_bad_edit_input(service, tmp_path):
    src = Image.new("RGB", (64, 64), "white")
    blank = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    with pytest.raises(UserError, match="upload an image to edit"):
        service.edit({"background": None, "layers": []}, None, "a red circle", "", 1, 0, OPTIONS)
    with pytest.raises(UserError, match="paint over the region"):
        service.edit({"background": src, "layers": []}, None, "a red circle", "", 1, 0, OPTIONS)
    with pytest.raises(UserError, match="the mask selects nothing"):
        service.edit({"background": src, "layers": [blank]}, None, "a red circle", "", 1, 0, OPTIONS)
    other = tmp_path / "small_mask.png"
    Image.new("L", (16, 16), 255).save(other)
    with pytest.raises(UserError, match="the mask is 16x16 pixels but the image is 64x64"):
        service.edit(src, str(other), "a red circle", "", 1, 0, OPTIONS)
    painted = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    with pytest.raises(UserError, match="enter a prompt"):
        service.edit({"background": src, "layers": [painted]}, None, "", "", 1, 0, OPTIONS)
