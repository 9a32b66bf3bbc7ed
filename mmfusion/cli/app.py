"""Build an argparse command tree from plain typed functions and their docstrings.

Parameters before `*` become positional arguments, keyword-only ones become `--dashed-options`;
`bool` options get `--x / --no-x`, `list[...]` options may be repeated, `Literal[...]` gives choices,
and the help text of each parameter comes from the "Args:" section of the docstring.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

Tree = dict[str, "Callable[..., Any] | Tree"]

# the help of options that several commands share, written once: a command's docstring may still
# give its own "Args:" line for one of them, which then wins
SHARED_HELP = {
    "dtype": "weights' dtype for sampling and captioning; bfloat16 halves the backbone's memory and samples "
    "large models faster on CPUs with native bf16 (AMX); small models gain little (docs/BENCHMARKS.md)",
    "device": "cpu, cuda, cuda:N, or auto (a GPU when there is one)",
    "image_root": "the folder that the image paths of a COCO / Karpathy JSON or a table are relative to "
    "(default: the file's own folder)",
    "image_column": "the data's column of images or image paths (default: found by its usual names)",
    "caption_column": "the data's column of captions, a string or a list of strings per row (default: found by "
    "its usual names: captions, caption, text, sentences ...)",
    "adapter": "PATH[:WEIGHT]: a LoRA adapter folder from `mmfusion finetune`, at WEIGHT (default 1); repeat for "
    "several: their weighted deltas add up, e.g. --adapter A:0.7 --adapter B:0.3",
    "model": "a model folder (config.json, model.safetensors, tokenizer.json) or a hub model id (owner/name; "
    "with HF_HUB_OFFLINE=1 read from the hub's cache only)",
    "revision": "with a hub model id as --model: its branch, tag or commit hash (default: main)",
}


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    head, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        m = re.match(r"\s{2,}(\w+):\s*(.*)", line)
        if m and not line.startswith(" " * 6):
            name = m.group(1)
            helps[name] = m.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return head.strip(), helps


def summary(head: str) -> str:
    """The one-line summary of a command for the list of commands: the first sentence of the
    docstring's first paragraph, which may run over several lines (the whole paragraph if no sentence
    end is followed by a capital; "e.g.", "i.e.", "etc." and "vs." do not end a sentence)."""
    paragraph = " ".join(head.split("\n\n")[0].split())
    for end in re.finditer(r"[.!?](?=\s+[A-Z])", paragraph):
        if not re.search(r"\b(?:e\.g|i\.e|etc|vs)$", paragraph[: end.start()], re.I):
            return paragraph[: end.end()]
    return paragraph


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _literal(text: str) -> str:
    """`text` as an argparse help string, which argparse %-formats (a docstring's "95%" would fail)."""
    return text.replace("%", "%%")


def _add_param(parser: argparse.ArgumentParser, p: inspect.Parameter, tp: Any, help_text: str) -> None:
    tp = _unwrap_optional(tp)
    positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    has_default = p.default is not inspect.Parameter.empty
    help_text = _literal(help_text)
    kwargs: dict[str, Any] = {"help": help_text}
    origin = typing.get_origin(tp)
    if origin is list:
        inner = typing.get_args(tp)[0]
        kwargs["type"] = inner
        if positional:
            kwargs["nargs"] = "*" if has_default else "+"
        else:
            kwargs["action"] = "append"
    elif origin is Literal:
        kwargs["choices"] = list(typing.get_args(tp))
        kwargs["type"] = type(kwargs["choices"][0])
    elif tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = tp
    if positional:
        if has_default and "nargs" not in kwargs:
            kwargs["nargs"] = "?"
        if has_default:
            kwargs["default"] = p.default
        parser.add_argument(p.name, metavar=p.name.upper(), **kwargs)
        return
    flag = "--" + p.name.replace("_", "-")
    if has_default:
        kwargs["default"] = p.default
        if p.default is not None and tp is not bool and not kwargs.get("action"):
            kwargs["help"] = f"{help_text} (default: {p.default})".strip()
    else:
        kwargs["required"] = True
    parser.add_argument(flag, dest=p.name, **kwargs)


def add_function(sub: argparse._SubParsersAction, name: str, fn: Callable[..., Any]) -> None:
    head, helps = _doc_parts(fn)
    parser = sub.add_parser(
        name,
        help=_literal(summary(head)) if head else None,
        description=head,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        _add_param(parser, p, hints.get(p.name, str), helps.get(p.name) or SHARED_HELP.get(p.name, ""))
    parser.set_defaults(_fn=fn)


def build_parser(tree: Tree, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _fill(parser, tree)
    return parser


def _fill(parser: argparse.ArgumentParser, tree: Tree) -> None:
    sub = parser.add_subparsers(metavar="COMMAND", required=True)
    for name, node in tree.items():
        if name == "__doc__":
            continue
        if callable(node):
            add_function(sub, name, node)
        else:
            doc = node.get("__doc__")
            child = sub.add_parser(name, help=doc and _literal(doc), description=doc)
            _fill(child, node)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    args = vars(parser.parse_args(argv))
    fn = args.pop("_fn")
    return fn(**args)
