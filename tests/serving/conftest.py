"""A served tiny model: the page on a free loopback port, for the client and browser tests."""

import os
import socket

import pytest

# CI sets MMFUSION_REQUIRE_SERVE_TESTS=1: there a missing Gradio fails the run instead of skipping it
REQUIRED = os.environ.get("MMFUSION_REQUIRE_SERVE_TESTS") == "1"
if not REQUIRED:
    pytest.importorskip("gradio", reason='the web demo needs the [serve] extra: pip install -e ".[serve]"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_pipe(trained_tiny):
    from mmfusion.pipeline import MMFusion

    return MMFusion.from_pretrained(trained_tiny)


def launch(service, max_queue=16, concurrency=4):
    from mmfusion.serving.app import CSS, build_app

    app = build_app(service, max_queue=max_queue, concurrency=concurrency)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, quiet=True)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(trained_tiny, tiny_pipe):
    """(service, url) of the tiny model's page."""
    from mmfusion.serving.service import Service

    service = Service(tiny_pipe, str(trained_tiny), max_batch=16)
    app, url = launch(service)
    yield service, url
    app.close()
    service.close()
