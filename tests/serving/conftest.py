"""A served tiny model: the page on a free loopback port, for the client and browser tests."""

import os
import socket
import time

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


class Running:
    """A server on a thread: what `mmfusion serve` runs (the page and the JSON API), stopped by close()."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server did not stop"


def launch(service, max_queue=16, concurrency=4):
    from mmfusion.serving.app import build_server

    running = Running(build_server(service, max_queue=max_queue, concurrency=concurrency))
    return running, f"http://127.0.0.1:{running.port}/"


def at_once(service, n, call, **launch_args):
    """`call(url, i)` for i in range(n), all at once, against a server of its own for `service`, which is
    closed after: the results in order."""
    from concurrent.futures import ThreadPoolExecutor

    running, url = launch(service, **launch_args)
    try:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda i: call(url, i), range(n)))
    finally:
        running.close()
        service.close()


@pytest.fixture(scope="module")
def served(trained_tiny, tiny_pipe):
    """(service, url) of the tiny model's page."""
    from mmfusion.serving.service import Service

    service = Service(tiny_pipe, str(trained_tiny), max_batch=16)
    app, url = launch(service)
    yield service, url
    app.close()
    service.close()
