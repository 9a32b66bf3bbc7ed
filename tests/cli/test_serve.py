"""`mmfusion serve` refuses in one line what it cannot do: no Gradio installed, a port already taken."""

import socket
import sys

import pytest

from mmfusion.cli.main import main


def test_without_gradio_the_error_names_the_extra(trained_tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["serve", "--model", str(trained_tiny)]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[serve]"' in err and len(err.strip().splitlines()) == 1


def test_a_taken_port_is_one_line(trained_tiny, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(trained_tiny), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_bad_numbers_are_refused_before_the_model_loads(capsys):
    assert main(["serve", "--model", "no/such-model", "--port", "0"]) == 2
    assert "--port must be within 1..65535" in capsys.readouterr().err
    assert main(["serve", "--model", "no/such-model", "--max-queue", "0"]) == 2
    assert "--max-queue, --concurrency and --max-batch must be at least 1" in capsys.readouterr().err
