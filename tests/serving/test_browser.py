"""The page in a real browser (headless Chromium, Debian's package, driven by Playwright): a prompt typed
and submitted fills the gallery with images, a screenshot is saved, an uploaded image gets the caption
the Python API gives it, and an empty prompt shows its message in the page.

MMFUSION_SCREENSHOT=path.png keeps the screenshot (docs/images/serve.png is made this way, with
MMFUSION_SERVE_MODEL naming the demo model to serve instead of the tiny one)."""

import os
import shutil
from pathlib import Path

import pytest

from tests.serving.conftest import REQUIRED, launch

if REQUIRED:
    import playwright.sync_api  # noqa: F401 - a missing package fails here on CI
else:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not REQUIRED, reason="no chromium (apt-get install -y chromium; .ci/run does)"
)


@pytest.fixture(scope="module")
def page_url(trained_tiny, tiny_pipe):
    from mmfusion.pipeline import MMFusion
    from mmfusion.serving.service import Service

    model = os.environ.get("MMFUSION_SERVE_MODEL")
    pipe = MMFusion.from_pretrained(model) if model else tiny_pipe
    service = Service(pipe, model or "tiny-test-model")
    app, url = launch(service)
    yield url, pipe
    app.close()
    service.close()


@pytest.fixture(scope="module")
def browser():
    import playwright.sync_api

    with playwright.sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_prompt_to_gallery_and_upload_to_caption_in_chromium(page_url, browser, tmp_path):
    url, pipe = page_url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector("#t2i-run", timeout=60_000)

    prompt = "a red circle to the left of a blue square"
    page.get_by_label("prompt", exact=True).fill(prompt)
    page.click("#t2i-run")
    loaded = "Array.from(document.querySelectorAll('#t2i-gallery img')).filter(e => e.complete && e.naturalWidth > 0)"
    page.wait_for_function(f"{loaded}.length >= 4", timeout=120_000)
    sizes = page.eval_on_selector_all("#t2i-gallery img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert len(sizes) >= 4 and all(w == pipe.image_cfg.image_size for w in sizes[:4]), sizes
    assert "--seed 0 --num-images 4" in page.input_value("#t2i-command textarea")
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MMFUSION_SCREENSHOT"):
        shutil.copy(shot, os.environ["MMFUSION_SCREENSHOT"])

    # caption an uploaded image
    image = pipe.generate("a green triangle", seed=1)[0].resize((64, 64))
    image.save(tmp_path / "upload.png")
    page.get_by_role("tab", name="Caption").click()
    page.set_input_files("#cap-image input[type=file]", str(tmp_path / "upload.png"))
    page.wait_for_selector("#cap-image img", timeout=30_000)
    page.click("#cap-run")
    page.wait_for_function(
        "document.querySelector('#cap-text textarea') && document.querySelector('#cap-text textarea').value.length > 0",
        timeout=60_000,
    )
    from mmfusion.image_io import open_image

    expected = pipe.caption(open_image(Path(tmp_path / "upload.png"), "uploaded file"))[0]
    assert page.input_value("#cap-text textarea") == expected

    # an empty prompt: the message appears in the page
    page.get_by_role("tab", name="Text to image").click()
    page.get_by_label("prompt", exact=True).fill("")
    page.click("#t2i-run")
    page.get_by_text("enter a prompt").first.wait_for(timeout=30_000)
    page.close()
