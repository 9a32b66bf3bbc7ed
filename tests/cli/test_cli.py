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
    assert "with and without the KV cache, Token-Shuffle s = 1, 2, 4, FlexAttention vs SDPA." in out


def test_bench_help_names_every_benchmark(capsys):
    from mmfusion.bench import BENCHES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHES)
