import subprocess
import sys

import pytest

from mmfusion.cli.main import COMMANDS, main


def _paths(tree, prefix=()):
    for name, node in tree.items():
        if name == "__doc__":
            continue
        if callable(node):
            yield (*prefix, name)
        else:
            yield from _paths(node, (*prefix, name))


@pytest.mark.parametrize("path", list(_paths(COMMANDS)), ids=" ".join)
def test_every_subcommand_has_help(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmfusion " + " ".join(path))


def _leaf_parsers(parser, prefix=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _leaf_parsers(child, (*prefix, name))


def _unexplained(parser):
    """(command, argument) pairs whose help is empty apart from argparse's "(default: ...)"."""
    import re

    return [
        (" ".join(path), action.dest)
        for path, leaf in _leaf_parsers(parser)
        for action in leaf._actions
        if action.dest != "help" and not re.sub(r"\(default: .*\)$", "", action.help or "").strip()
    ]


def test_every_option_is_explained():
    """Each argument of each command has a help text from its function's docstring."""
    from mmfusion.cli.app import build_parser

    parser = build_parser(COMMANDS, "mmfusion", "")
    assert {path for path, _ in _leaf_parsers(parser)} == set(_paths(COMMANDS))
    assert _unexplained(parser) == []

    def undocumented(data: str, *, steps: int = 5) -> None:
        """Do something.

        Args:
            data: where the data is
        """

    assert _unexplained(build_parser({"run": undocumented}, "prog", "")) == [("run", "steps")]


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "mmfusion.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout


def test_data_and_tokenizer_commands(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "d"), "--n", "30", "--n-val", "5", "--n-test", "5"]) == 0
    assert (
        main(
            ["tokenizer", "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]
        )
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert (
        main(["data", "export", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "c"), "--format", "coco"]) == 0
    )
    assert (tmp_path / "c" / "captions_test.json").exists()


def test_data_shapes_of_a_domain(tmp_path, capsys):
    import datasets

    from mmfusion.data.shapes import DOMAINS

    assert main(["data", "shapes", "--domain", "digits", "--n", "50", "--out", str(tmp_path / "d")]) == 0
    assert "train: 50" in capsys.readouterr().out
    rows = datasets.load_from_disk(str(tmp_path / "d"))["train"]
    objects = [o for row in rows for o in row["objects"]]
    assert {o["shape"] for o in objects} == set(DOMAINS["digits"]["shapes"])
    assert {o["colour"] for o in objects} == set(DOMAINS["digits"]["colours"])
    out = tmp_path / "s"
    assert (
        main(["data", "shapes", "--shapes", "ring,cross", *"--n 20 --n-val 2 --n-test 2".split(), "--out", str(out)])
        == 0
    )
    shapes = {o["shape"] for row in datasets.load_from_disk(str(out))["train"] for o in row["objects"]}
    assert shapes == {"ring", "cross"}
    capsys.readouterr()  # what the runs above wrote (progress bars, where datasets shows them)
    for args, message in (
        (["--domain", "letters"], "error: unknown domain 'letters'; known: new_shapes, digits"),
        (["--shapes", "ring,hexagon"], "error: unknown shape 'hexagon'; known: circle, square, triangle, cross"),
        (["--domain", "digits", "--colours", "red"], "error: --domain sets the colours and shapes"),
    ):
        code = main(["data", "shapes", "--n", "10", "--out", str(tmp_path / "bad"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(message) and "\n" not in err, err
        assert not (tmp_path / "bad").exists()


def test_missing_data_is_one_line_error(tmp_path, capsys):
    code = main(["tokenizer", "train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err


def test_help_texts_may_contain_percent_signs(capsys):
    from mmfusion.cli.app import build_parser

    def run(*, rate: float = 0.5) -> None:
        """Run at a rate.

        Args:
            rate: fraction of the steps, e.g. 0.5 for 50% of them
        """

    with pytest.raises(SystemExit):
        build_parser({"run": run}, "prog", "100% tested").parse_args(["run", "--help"])
    assert "0.5 for 50% of them (default: 0.5)" in capsys.readouterr().out


def test_command_summaries_are_whole_sentences(capsys):
    """The list of commands shows each command's first sentence, also when it runs over two lines."""
    from mmfusion.cli.app import summary

    assert summary("Do a thing over\n  two lines. Then more.\n\nDetails.") == "Do a thing over two lines."
    assert summary("No sentence end\nat all\n\nDetails.") == "No sentence end at all"
    assert summary("Use e.g. a model. Then.") == "Use e.g. a model."
    assert summary("Precompute (e.g. VAE latents) once. Then.") == "Precompute (e.g. VAE latents) once."
    assert summary("A vs. B, i.e. That one. Then.") == "A vs. B, i.e. That one."
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Token-Shuffle s = 1, 2, 4, FlexAttention vs SDPA, and mmfusion against its peers on the same work" in out
    assert "the diffusers scheduler loop). Writes" not in out  # the summary ends with its first sentence


def test_bench_help_names_every_benchmark(capsys):
    from benchmarks.bench import BENCHES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHES)


def _one_line_error(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err, (argv, err)
    return err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.precision=bf17"], "train.precision: must be one of"),
        (["train.strategy=ddpp"], "train.strategy: must be one of auto, ddp, fsdp"),
        (["train.max_time_minutes=0"], "train.max_time_minutes: must be positive"),
        (["train.max_steps=0"], "train.max_steps: must be at least 1"),
        (["model.shuffle=2"], "model.shuffle: 2 fuses discrete image codes: it needs image.kind=vq"),
        (["data.source=/nonexistent/data"], "data source /nonexistent/data does not exist"),
    ],
)
def test_bad_training_settings_are_one_line_errors_before_any_output(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert message in _one_line_error(capsys, ["train", "model.preset=tiny", f"train.out={out}", *overrides])
    assert not out.exists()


def test_a_gpu_the_machine_lacks_and_a_missing_checkpoint_leave_no_output(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert "torch sees no CUDA GPU" in _one_line_error(capsys, ["train", f"train.out={out}", "train.accelerator=gpu"])
    assert "no checkpoint" in _one_line_error(capsys, ["train", f"train.out={out}", "--resume"])
    assert not out.exists()


def test_bad_values_for_a_trained_model_are_one_line_errors(trained_tiny, tmp_path, capsys):
    model = ["--model", str(trained_tiny)]
    data = str(trained_tiny.parent / "data")
    out = tmp_path / "out"
    assert "LoRA needs a rank of at least 1" in _one_line_error(
        capsys, ["finetune", *model, "--data", data, "--out", str(out), "--lora-r", "0"]
    )
    for bad, message in ((["--steps", "0"], "max_steps: must be at least 1"), (["--precision", "bf17"], "precision")):
        assert message in _one_line_error(capsys, ["finetune", *model, "--data", data, "--out", str(out), *bad])
    assert "nothing to evaluate" in _one_line_error(
        capsys, ["eval", "shapes", *model, "--out", str(out), "--n-single", "0", "--n-pair", "0"]
    )
    assert "--scale enlarges the grid" in _one_line_error(
        capsys, ["generate", *model, "--prompt", "a red circle", "--out", str(out), "--scale", "0"]
    )
    ckpt = next(trained_tiny.parent.glob("checkpoints/*.ckpt"))
    assert "is a file; --model takes a model folder" in _one_line_error(
        capsys, ["generate", "--model", str(ckpt), "--prompt", "a red circle", "--out", str(out)]
    )
    assert "is a folder: give an image file" in _one_line_error(capsys, ["caption", *model, str(tmp_path)])
    for command in ("vq", "vae"):
        assert "--steps must be at least 1" in _one_line_error(
            capsys, [command, "train", "--data", data, "--out", str(out), "--steps", "0"]
        )
    assert not out.exists()


def test_bench_command_runs_an_item_end_to_end(tmp_path, monkeypatch):
    """`mmfusion bench --quick --only matmul`: the item runs in its own process and lands in the quick
    JSON; the recorded tables are not touched."""
    import json

    from benchmarks import bench

    monkeypatch.setattr(bench, "DOC", tmp_path / "docs" / "BENCHMARKS.md")
    assert main(["bench", "--quick", "--only", "matmul"]) == 0
    result = json.loads((tmp_path / "docs" / "benchmarks-quick.json").read_text())
    assert result["quick"] and result["matmul"]["fp32_gflops"] > 0 and "error" not in result["matmul"]
    assert not (tmp_path / "docs" / "BENCHMARKS.md").exists()


def test_shared_options_have_one_help_text_everywhere(capsys):
    """--dtype, --device and --adapter are explained once (cli/app.py) and every command that takes
    them shows that text."""
    import inspect

    from mmfusion.cli.app import SHARED_HELP
    from mmfusion.cli.main import COMMANDS

    def commands(tree, path=()):
        for name, node in tree.items():
            if callable(node):
                yield (*path, name), node
            elif isinstance(node, dict):
                yield from commands(node, (*path, name))

    seen = set()
    for path, fn in commands(COMMANDS):
        shared = [p for p in inspect.signature(fn).parameters if p in SHARED_HELP]
        if not shared:
            continue
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for name in shared:
            assert " ".join(SHARED_HELP[name].split())[:60] in out, (path, name)
            seen.add(name)
    assert seen == set(SHARED_HELP)
