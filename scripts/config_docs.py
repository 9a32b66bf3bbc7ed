"""Write docs/config.md: every key of the run config with its type, default and meaning.

The meanings are the comments written beside (or just above) each field of the config dataclasses, so
the page is made from the code and cannot drift from it: `--check` exits 1 when the page differs from
what the code gives now (the test suite runs it).

    python scripts/config_docs.py            # rewrite docs/config.md
    python scripts/config_docs.py --check    # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any

from mmfusion.config import RunConfig
from mmfusion.model.config import PRESETS

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"

HEADER = """# Configuration keys

Every key of a run config (`mmfusion train --config FILE.yaml section.key=value ...`), with its type,
its default and what it does. A YAML file sets any of them by section:

```yaml
model:
  preset: small
train:
  lr: 3.0e-3
  max_time_minutes: 12
```

and `section.key=value` on the command line overrides the file (`train.lr=1e-3 model.dim=192`).
A bad setting (an unknown key, a value of the wrong type or out of range) is refused with one line that
starts with its dotted key: `train.lr: must be of type float, got 'fast'`. The shipped configs are in
`mmfusion/configs/` (`demo.yaml` is the CPU demo).

This page is generated from the config dataclasses by `python scripts/config_docs.py`; a test fails
when it is stale.
"""

SECTIONS = {
    "model": "The transformer: its size, attention and heads. `preset` picks a named size first "
    f"({', '.join(sorted(PRESETS))}); the other keys override it. Defaults below are the `small` preset's.",
    "image": "How images become tokens: pixel patches, VAE latents or VQ codes.",
    "diffusion": "The diffusion process and CausalFusion's dual factorisation (AR steps x diffusion steps).",
    "objective": "The joint training objective: T2I and caption order, their losses, packing.",
    "data": "The training data: the built-in shapes set or your own captioned images, batching, tokenizer.",
    "train": "The training run: optimizer, schedule, precision, devices, checkpoints, time budget.",
    "sample": "Each sampler's default settings, saved with a model: `mmfusion generate`, `caption` and the "
    "pipeline start from them, and their options change them. A flat `sample:` mapping of the image "
    "samplers' keys, as configs before these parts had, still loads: each key goes to the part that has it.",
}


def field_notes(cls: type) -> dict[str, str]:
    """Each field's comment: the one on its line, after the comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    body = ast.parse(source).body[0].body
    notes = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        beside = comments.get(node.end_lineno, "") if node.end_lineno in comments else ""
        notes[node.target.id] = " ".join(part for part in (*above, beside) if part)
    return notes


def field_types(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    return {
        node.target.id: ast.unparse(node.annotation)
        for node in ast.parse(source).body[0].body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_lines(key: str, value: Any, intro: str) -> list[str]:
    """The table of one section; a section made of parts (`sample`) gets one table per part after it."""
    cls = type(value)
    notes, types = field_notes(cls), field_types(cls)
    fields = dataclasses.fields(cls)
    parts = [f for f in fields if dataclasses.is_dataclass(getattr(value, f.name))]
    lines = [f"{'###' if '.' in key else '##'} `{key}`", "", intro, ""]
    if parts:
        lines += [f"- `{key}.{f.name}`: {notes.get(f.name, '')}" for f in parts] + [""]
        for f in parts:
            part = getattr(value, f.name)
            lines += section_lines(f"{key}.{f.name}", part, (type(part).__doc__ or "").strip().splitlines()[0])
        return lines
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    if key == "model":
        lines.append("| `preset` | str | small | a named size, then overridden by the keys below |")
    for f in fields:
        lines.append(
            f"| `{f.name}` | {cell(types[f.name])} | {cell(show(getattr(value, f.name)))} | "
            f"{cell(notes.get(f.name, ''))} |"
        )
    return lines + [""]


def render() -> str:
    defaults = RunConfig()
    lines = [HEADER]
    for section in (f.name for f in dataclasses.fields(RunConfig)):
        lines += section_lines(section, getattr(defaults, section), SECTIONS[section])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from the code")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python scripts/config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
