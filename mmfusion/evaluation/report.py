"""Write an experiment's results as JSON plus a Markdown table, the form the docs quote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmfusion.hub import write_atomic


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, through a temporary file: never a half-written file."""
    write_atomic(Path(path), lambda p: p.write_text(json.dumps(data, indent=2)))


def write_report(out: Path, stem: str, results: dict[str, Any], header: list[str], rows: list[list[Any]]) -> str:
    """Save ``results`` to ``out/stem.json`` and a table to ``out/stem.md``; return (and print) the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(table)
    print(table, end="")
    return table
